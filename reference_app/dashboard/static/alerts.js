// The alerts panel: an owner's quota thresholds, expiry warnings and webhook
// (/v1/alerts/settings), and the recent deliveries (/v1/alerts/deliveries).

import { api, q } from './api.js';
import { reveal } from './reveal.js';
import { state } from './state.js';
import { $, fill, h, numbers, toast, when } from './util.js';

const view = { settings: null, extra: [], seq: 0 };

const percent = (shares) => shares.map((s) => Math.round(s * 1000) / 10).join(', ');

function owner() {
  return state.me.admin ? $('alerts-owner').value.trim() : state.me.owner;
}

function kindsBoxes(kinds, chosen) {
  fill($('alerts-kinds'), kinds.map((kind) => {
    const id = `kind-${kind.replace('.', '-')}`;
    return h('label', { class: 'check', for: id }, h('input', { type: 'checkbox', id, value: kind, checked: chosen.includes(kind) }), ' ', h('code', {}, kind));
  }));
}

function syncDefaults() {
  const off = $('alerts-defaults').checked;
  $('alerts-quota').disabled = off;
  $('alerts-expiry').disabled = off;
}

function showSettings(settings) {
  view.settings = settings;
  $('alerts-form').dataset.owner = settings.owner; // whose settings the form shows
  const rules = settings.rules || settings.defaults;
  $('alerts-defaults-text').textContent = `quota ${percent(settings.defaults.quota_thresholds)} %, expiry ${settings.defaults.expiry_days.join(', ')} days`;
  $('alerts-defaults').checked = settings.rules === null;
  $('alerts-quota').value = percent(rules.quota_thresholds);
  $('alerts-expiry').value = rules.expiry_days.join(', ');
  const [hook, ...others] = settings.webhooks;
  view.extra = others; // edited through the API only; kept as they are
  $('alerts-url').value = hook ? hook.url : '';
  $('alerts-secret').value = '';
  $('alerts-secret-help').textContent = hook
    ? 'A secret is set. Leave empty to keep it, or type a new one (16 characters or more).'
    : 'Optional: left empty, a new secret is made and shown once.';
  kindsBoxes(settings.kinds, hook ? hook.kinds : []);
  syncDefaults();
}

function deliveryRow(d) {
  const answer = d.http_status ? `HTTP ${d.http_status}` : d.error || '–';
  return h('tr', {},
    h('td', { 'data-label': 'Time' }, when(d.at)),
    h('td', { 'data-label': 'Alert' }, h('code', {}, d.kind)),
    h('td', { 'data-label': 'Key', class: 'mono' }, d.key_id),
    h('td', { 'data-label': 'Target' }, d.target),
    h('td', { 'data-label': 'Status' }, h('span', { class: `badge delivery-${d.status}` }, d.status)),
    h('td', { 'data-label': 'Attempts' }, d.attempts),
    h('td', { 'data-label': 'Answer' }, answer));
}

export async function loadDeliveries() {
  const name = owner();
  if (!name) return;
  try {
    const page = await api('GET', `/v1/alerts/deliveries${q({ owner: state.me.admin ? name : null })}`);
    if (name !== owner()) return;
    fill($('deliveries-body'), page.data.map(deliveryRow));
    if (!page.data.length) $('deliveries-body').append(h('tr', {}, h('td', { colspan: 7, class: 'muted empty-row' }, 'No deliveries yet.')));
  } catch (error) {
    fill($('deliveries-body'), h('tr', {}, h('td', { colspan: 7, class: 'muted empty-row' }, error.text || error.message)));
  }
}

export async function loadAlerts() {
  $('alerts-error').textContent = '';
  const name = owner();
  if (!name) {
    $('alerts-error').textContent = state.me.admin ? 'Name an owner.' : 'This key has no owner, so it has no alert settings.';
    return;
  }
  const seq = (view.seq += 1); // a slower, older answer must not overwrite a newer one
  try {
    const settings = await api('GET', `/v1/alerts/settings${q({ owner: state.me.admin ? name : null })}`);
    if (seq === view.seq) showSettings(settings);
  } catch (error) {
    if (seq === view.seq) $('alerts-error').textContent = error.text || error.message;
  }
  await loadDeliveries();
}

function body() {
  const url = $('alerts-url').value.trim();
  const secret = $('alerts-secret').value;
  const kinds = [...$('alerts-kinds').querySelectorAll('input:checked')].map((i) => i.value);
  const webhooks = url ? [{ url, kinds, ...(secret ? { secret } : {}) }] : [];
  for (const hook of view.extra) webhooks.push({ url: hook.url, kinds: hook.kinds });
  const rules = $('alerts-defaults').checked ? null : {
    quota_thresholds: numbers($('alerts-quota').value).map((p) => p / 100),
    expiry_days: numbers($('alerts-expiry').value),
  };
  return { webhooks, rules };
}

async function save(event) {
  event.preventDefault();
  $('alerts-error').textContent = '';
  let payload;
  try {
    payload = body();
  } catch (error) {
    $('alerts-error').textContent = error.message;
    return;
  }
  try {
    const saved = await api('PUT', `/v1/alerts/settings${q({ owner: state.me.admin ? owner() : null })}`, payload);
    const made = saved.new_secrets;
    delete saved.new_secrets;
    showSettings(saved);
    toast(`Saved the alert settings of ${saved.owner}.`);
    if (made.length) reveal(made[0], 'Copy the webhook signing secret', { label: `Signing secret for ${made[0].url}`, name: 'secret' });
    made.length = 0;
  } catch (error) {
    $('alerts-error').textContent = error.text || error.message;
  }
}

export function initAlerts() {
  $('alerts-form').addEventListener('submit', save);
  $('alerts-reload').addEventListener('click', loadAlerts);
  $('alerts-defaults').addEventListener('change', syncDefaults);
  // Another owner's settings load when the name changes (on Enter or leaving the
  // field), never again for the same name, so edits in progress are not reset.
  const switchOwner = () => {
    if (owner() && owner() !== $('alerts-form').dataset.owner) loadAlerts();
  };
  $('alerts-owner').addEventListener('change', switchOwner);
  $('alerts-owner').addEventListener('keydown', (event) => {
    if (event.key !== 'Enter') return;
    event.preventDefault(); // not a submit of the settings
    switchOwner();
  });
}

export function prepareAlerts() {
  const input = $('alerts-owner');
  input.value = state.me.owner || '';
  input.readOnly = !state.me.admin;
  $('alerts-owner-help').textContent = state.me.admin
    ? 'Alerts are set per owner: they cover every key of that owner.'
    : 'Your key manages the alerts of its own owner only.';
}
