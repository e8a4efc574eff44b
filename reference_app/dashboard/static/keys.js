// The keys panel: the table (search, status filter, sort), and the dialogs to
// generate, edit, rotate and revoke a key. The revealed secret is handled by
// reveal.js and never kept here.

import { api, listAll, q } from './api.js';
import { reveal } from './reveal.js';
import { ScopePicker } from './scopes.js';
import { STATUS_TEXT, keyLabel, owners, state, statusOf } from './state.js';
import { $, fill, h, relative, toast, when } from './util.js';

const view = { sort: 'created_at', dir: -1, editing: null, acting: null, picker: null };
const listeners = [];

/** Call `fn` whenever the list of keys changes (the usage panel's key menu). */
export function onKeysChanged(fn) {
  listeners.push(fn);
}

function columns() {
  return [
    { id: 'name', title: 'Name' },
    state.me.admin && { id: 'owner', title: 'Owner' },
    { id: 'hint', title: 'Key' },
    { id: 'status', title: 'Status' },
    { id: 'scopes', title: 'Scopes', unsorted: true },
    { id: 'plan', title: 'Plan' },
    { id: 'created_at', title: 'Created' },
    { id: 'last_used', title: 'Last used' },
    { id: 'actions', title: 'Actions', unsorted: true },
  ].filter(Boolean);
}

function lastUsed(key) {
  if (key.last_used_at) return { at: new Date(key.last_used_at).getTime() / 1000, derived: false };
  const at = state.lastUsed.get(key.id);
  return at === undefined || at === null ? null : { at, derived: true };
}

function sortValue(key, column) {
  if (column === 'status') return statusOf(key);
  if (column === 'last_used') return lastUsed(key)?.at ?? -1;
  return (key[column] ?? '').toString().toLowerCase();
}

function matches(key, text, status) {
  if (status && statusOf(key) !== status) return false;
  if (!text) return true;
  const hay = [key.name, key.id, key.hint, key.owner || '', key.plan, ...key.scopes].join(' ').toLowerCase();
  return text.toLowerCase().split(/\s+/).every((word) => hay.includes(word));
}

function scopeSummary(scopes) {
  const shown = scopes.slice(0, 4).map((scope) => h('code', { class: 'chip' }, scope));
  if (scopes.length > 4) shown.push(h('span', { class: 'chip more', title: scopes.join(', ') }, `+${scopes.length - 4}`));
  return scopes.length ? shown : h('span', { class: 'muted' }, 'none');
}

function lastUsedCell(key) {
  if (key.id === state.me.id) return h('span', { title: 'The key this dashboard is signed in with' }, 'now (this session)');
  const used = lastUsed(key);
  if (!used) {
    const title = state.lastUsed.has(key.id) ? 'No call recorded in the last 30 days' : null;
    return h('span', { class: 'muted', title }, '–');
  }
  if (!used.derived) return when(used.at);
  const days = Math.floor((Date.now() / 1000 - used.at) / 86400);
  const text = days <= 0 ? 'today' : days === 1 ? 'yesterday' : `${days} days ago`;
  return h('span', { title: 'From the usage records (to the day)' }, text);
}

function actionButtons(key) {
  const revoked = key.status === 'revoked';
  const button = (text, action, extra = {}) =>
    h('button', { type: 'button', class: `small ${extra.class || 'ghost'}`, 'data-action': action, 'data-key': key.id, 'aria-label': `${text} ${key.name}`, disabled: extra.disabled }, text);
  return h('div', { class: 'actions' },
    button('Usage', 'usage'),
    button('Edit', 'edit', { disabled: revoked }),
    button('Rotate', 'rotate', { disabled: revoked }),
    button('Revoke', 'revoke', { class: 'danger-ghost', disabled: revoked }));
}

function cell(column, key) {
  const status = statusOf(key);
  switch (column.id) {
    case 'name': return [h('strong', {}, key.name), h('br'), h('small', { class: 'muted mono' }, key.id)];
    case 'owner': return key.owner || h('span', { class: 'muted' }, 'none');
    case 'hint': return h('code', {}, key.hint);
    case 'status': {
      const title = status === 'expiring' || key.expires_at ? `expires ${when(key.expires_at)}` : key.revoked_reason || null;
      return h('span', { class: `badge status-${status}`, title }, STATUS_TEXT[status]);
    }
    case 'scopes': return scopeSummary(key.scopes);
    case 'plan': return key.plan;
    case 'created_at': return when(key.created_at);
    case 'last_used': return lastUsedCell(key);
    default: return actionButtons(key);
  }
}

export function renderKeys() {
  const cols = columns();
  fill($('keys-head'), cols.map((column) => {
    if (column.unsorted) return h('th', { scope: 'col' }, column.title);
    const sorted = view.sort === column.id;
    const ariaSort = sorted ? (view.dir > 0 ? 'ascending' : 'descending') : 'none';
    const arrow = sorted ? (view.dir > 0 ? ' ▲' : ' ▼') : '';
    return h('th', { scope: 'col', 'aria-sort': ariaSort },
      h('button', { type: 'button', class: 'sort', 'data-sort': column.id }, column.title, h('span', { 'aria-hidden': 'true' }, arrow)));
  }));
  const text = $('key-search').value.trim();
  const status = $('key-status').value;
  const rows = state.keys.filter((key) => matches(key, text, status));
  rows.sort((a, b) => {
    const x = sortValue(a, view.sort);
    const y = sortValue(b, view.sort);
    return (x < y ? -1 : x > y ? 1 : 0) * view.dir;
  });
  fill($('keys-body'), rows.map((key) =>
    h('tr', { 'data-key': key.id, class: `row-${statusOf(key)}` },
      cols.map((column) => h('td', { 'data-label': column.title, class: `col-${column.id}` }, h('div', {}, cell(column, key)))))));
  if (!rows.length) {
    $('keys-body').append(h('tr', {}, h('td', { colspan: cols.length, class: 'muted empty-row' }, state.keys.length ? 'No key matches.' : 'No keys yet.')));
  }
  $('keys-count').textContent = `${rows.length} of ${state.keys.length} keys`;
}

async function deriveLastUsed(keys) {
  // The API's last_used_at is empty when the key store does not track it; the usage
  // records know, to the day. A few keys at a time, newest first, at most 25.
  const todo = keys.filter((key) => !key.last_used_at).slice(0, 25);
  const one = async (key) => {
    try {
      const usage = await api('GET', `/v1/keys/${encodeURIComponent(key.id)}/usage${q({ since: '30d', granularity: 'day' })}`);
      const used = (usage.series['*'] || []).filter((p) => p.requests > 0);
      state.lastUsed.set(key.id, used.length ? used[used.length - 1].start : null);
    } catch {
      /* usage may be disabled on this server: leave the column empty */
    }
  };
  for (let i = 0; i < todo.length; i += 4) await Promise.all(todo.slice(i, i + 4).map(one));
  renderKeys();
}

export async function loadKeys({ derive = true } = {}) {
  const keys = await listAll(`/v1/keys${q({ limit: 100 })}`);
  keys.sort((a, b) => (a.created_at < b.created_at ? 1 : -1));
  state.keys = keys;
  fill($('owner-list'), owners().map((name) => h('option', { value: name })));
  renderKeys();
  listeners.forEach((fn) => fn());
  if (derive) deriveLastUsed(keys);
}

function planHelp() {
  const plan = state.plans.find((p) => p.name === $('key-plan').value);
  if (!plan) return '';
  const parts = [plan.rate && `rate ${plan.rate}`, plan.quota_daily && `daily quota ${plan.quota_daily}`,
    plan.quota_monthly && `monthly quota ${plan.quota_monthly}`, plan.concurrency && `${plan.concurrency} at once`];
  return `The ${plan.name} plan allows ${parts.filter(Boolean).join(', ') || 'anything'}. Empty fields keep the plan’s value.`;
}

function openForm(key) {
  view.editing = key;
  const editing = Boolean(key);
  $('dlg-key-title').textContent = editing ? `Edit ${key.name}` : 'Generate new API key';
  $('key-submit').textContent = editing ? 'Save changes' : 'Generate key';
  $('key-expiry-label').textContent = editing ? 'New expiry (empty: unchanged)' : 'Expires in (empty: never)';
  $('key-error').textContent = '';
  $('key-owner-field').hidden = !state.me.admin;
  view.picker = new ScopePicker($('key-scopes'), { catalogue: state.catalogue, mine: state.me.scopes, admin: state.me.admin });
  const defaultPlan = state.me.admin ? (state.plans.find((p) => p.default) || {}).name : state.me.plan;
  fill($('key-plan'), state.plans.map((p) => h('option', { value: p.name }, p.default ? `${p.name} (default)` : p.name)));
  const limits = editing ? key.limits : {};
  $('key-name').value = editing ? key.name : '';
  $('key-owner').value = editing ? key.owner || '' : '';
  $('key-plan').value = editing ? key.plan : defaultPlan || '';
  $('key-rate').value = limits.rate || '';
  $('key-qd').value = limits.quota_daily ?? '';
  $('key-qm').value = limits.quota_monthly ?? '';
  $('key-cc').value = limits.concurrency ?? '';
  $('key-ips').value = editing ? key.ip_allow.join('\n') : '';
  $('key-expiry').value = '';
  $('key-expiry-help').textContent = editing && key.expires_at
    ? `Now expires ${when(key.expires_at)}. A duration such as 30d, or a date.`
    : 'A duration such as 30d or 12h, or a date (2027-01-01T00:00:00Z).';
  view.picker.set(editing ? key.scopes : []);
  $('key-limits').open = editing && Object.values(limits).some((v) => v !== null);
  $('plan-help').textContent = planHelp();
  $('dlg-key').showModal();
  $('key-name').focus();
}

const intOrNull = (id) => ($(id).value === '' ? null : Number($(id).value));

function formBody() {
  const limits = { rate: $('key-rate').value.trim() || null, quota_daily: intOrNull('key-qd'), quota_monthly: intOrNull('key-qm'), concurrency: intOrNull('key-cc') };
  return {
    name: $('key-name').value.trim(),
    owner: $('key-owner').value.trim() || null,
    scopes: view.picker.read(),
    plan: $('key-plan').value,
    limits,
    ip_allow: $('key-ips').value.split(/[\s,]+/).filter(Boolean),
    expires_in: $('key-expiry').value.trim().toLowerCase() === 'never' ? 'never' : ($('key-expiry').value.trim() || null),
  };
}

const same = (a, b) => JSON.stringify(a) === JSON.stringify(b);

function changes(key, body) {
  // Only what changed: a keys:self caller is checked on scopes and limits it sends.
  const patch = {};
  if (body.name !== key.name) patch.name = body.name;
  if (state.me.admin && body.owner !== key.owner) patch.owner = body.owner;
  if (!same([...body.scopes].sort(), [...key.scopes].sort())) patch.scopes = body.scopes;
  if (body.plan !== key.plan) patch.plan = body.plan;
  if (!same(body.limits, key.limits)) patch.limits = body.limits;
  if (!same(body.ip_allow, key.ip_allow)) patch.ip_allow = body.ip_allow;
  if (body.expires_in === 'never') {
    if (key.expires_at) patch.never_expires = true;
  } else if (body.expires_in) {
    patch.expires_in = body.expires_in;
  }
  return patch;
}

async function submitForm(event) {
  event.preventDefault();
  const body = formBody();
  const key = view.editing;
  try {
    if (key) {
      const patch = changes(key, body);
      if (Object.keys(patch).length) await api('PATCH', `/v1/keys/${encodeURIComponent(key.id)}`, patch);
      $('dlg-key').close();
      toast(`Saved ${body.name}.`);
    } else {
      if (!Object.values(body.limits).some((v) => v !== null)) delete body.limits;
      if (!state.me.admin || !body.owner) delete body.owner;
      if (!body.expires_in || body.expires_in === 'never') delete body.expires_in;
      const issued = await api('POST', '/v1/keys', body);
      $('dlg-key').close();
      reveal(issued, `Copy your new key “${issued.record.name}”`);
    }
    await loadKeys({ derive: false });
  } catch (error) {
    $('key-error').textContent = error.text || error.message;
  }
}

function find(id) {
  return state.keys.find((key) => key.id === id);
}

function openRotate(key) {
  view.acting = key;
  $('rotate-name').textContent = keyLabel(key);
  $('rotate-error').textContent = '';
  $('dlg-rotate').showModal();
  $('rotate-grace').focus();
}

async function submitRotate(event) {
  event.preventDefault();
  const key = view.acting;
  try {
    const issued = await api('POST', `/v1/keys/${encodeURIComponent(key.id)}/rotate`, { grace_seconds: Number($('rotate-grace').value) });
    $('dlg-rotate').close();
    reveal(issued, `Copy the new secret of “${key.name}”`);
    await loadKeys({ derive: false });
  } catch (error) {
    $('rotate-error').textContent = error.text || error.message;
  }
}

function openRevoke(key) {
  view.acting = key;
  $('revoke-name').textContent = keyLabel(key);
  $('revoke-reason').value = '';
  $('revoke-error').textContent = '';
  $('dlg-revoke').showModal();
  $('revoke-reason').focus();
}

async function submitRevoke(event) {
  event.preventDefault();
  const key = view.acting;
  try {
    await api('POST', `/v1/keys/${encodeURIComponent(key.id)}/revoke`, { reason: $('revoke-reason').value.trim() });
    $('dlg-revoke').close();
    toast(`Revoked ${key.name}: it is refused from now on.`);
    await loadKeys({ derive: false });
  } catch (error) {
    $('revoke-error').textContent = error.text || error.message;
  }
}

export function initKeys({ showUsage }) {
  $('key-search').addEventListener('input', renderKeys);
  $('key-status').addEventListener('change', renderKeys);
  $('keys-refresh').addEventListener('click', () => loadKeys().catch((e) => toast(e.message)));
  $('key-new').addEventListener('click', () => openForm(null));
  $('key-form').addEventListener('submit', submitForm);
  $('key-plan').addEventListener('change', () => { $('plan-help').textContent = planHelp(); });
  $('rotate-form').addEventListener('submit', submitRotate);
  $('revoke-form').addEventListener('submit', submitRevoke);
  $('keys-head').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-sort]');
    if (!button) return;
    const column = button.dataset.sort;
    view.dir = view.sort === column ? -view.dir : 1;
    view.sort = column;
    renderKeys();
    document.querySelector(`#keys-head button[data-sort="${column}"]`).focus();
  });
  $('keys-body').addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (!button) return;
    const key = find(button.dataset.key);
    if (!key) return;
    const action = button.dataset.action;
    if (action === 'usage') showUsage(key.id);
    else if (action === 'edit') openForm(key);
    else if (action === 'rotate') openRotate(key);
    else if (action === 'revoke') openRevoke(key);
  });
  for (const dialog of document.querySelectorAll('dialog')) {
    dialog.addEventListener('click', (event) => {
      if (event.target.closest('[data-close]')) dialog.close();
    });
  }
}
