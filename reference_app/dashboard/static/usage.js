// The usage panel: per key or overall, over the last hour, day or 30 days. Calls
// stacked by service, latency percentiles, windows and quotas, errors by code and
// the error log. Refreshed in place (see app.js for the polling).

import { api, q } from './api.js';
import { lines, stackedBars } from './charts.js';
import { GROUPS } from './scopes.js';
import { keyLabel, owners, state } from './state.js';
import { $, fill, h, ms, num, relative, when } from './util.js';

const view = { key: '', owner: '', since: '1h', data: null, errors: [], seq: 0 };
const HUES = { text: 212, image: 150, audio: 28, chat: 280 };
const PERCENTILES = [
  { key: 'p50', label: 'p50', color: '#2f7de1' },
  { key: 'p95', label: 'p95', color: '#d98200' },
  { key: 'p99', label: 'p99', color: '#cf3a3a' },
];

function colours(names) {
  const seen = {};
  const out = {};
  for (const name of names) {
    const family = name.split(':')[0];
    const index = (seen[family] = (seen[family] ?? -1) + 1);
    const hue = HUES[family];
    out[name] = hue === undefined ? `hsl(220, 8%, ${45 + index * 12}%)` : `hsl(${hue}, 70%, ${36 + (index % 5) * 9}%)`;
  }
  return out;
}

function serviceOrder(names) {
  const rank = (name) => {
    const i = GROUPS.findIndex((g) => name.startsWith(`${g.name}:`));
    return i < 0 ? GROUPS.length : i;
  };
  return [...names].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
}

export function renderKeyMenu() {
  const select = $('usage-key');
  const chosen = view.key;
  fill(select,
    h('option', { value: '' }, state.me.admin ? 'All keys (overall)' : 'All my owner’s keys (overall)'),
    state.keys.map((key) => h('option', { value: key.id }, `${keyLabel(key)}${key.status === 'active' ? '' : ` – ${key.status}`}`)));
  select.value = state.keys.some((k) => k.id === chosen) ? chosen : '';
  view.key = select.value;
  const field = $('usage-owner-field');
  field.hidden = !state.me.admin || Boolean(view.key);
  if (state.me.admin) {
    const owner = $('usage-owner').value;
    fill($('usage-owner'), h('option', { value: '' }, 'Every owner'), owners().map((name) => h('option', { value: name }, name)));
    $('usage-owner').value = owner;
  }
}

function tiles(total) {
  const statuses = Object.entries(total.statuses).sort().map(([k, v]) => `${k} ${v}`).join(' · ') || 'none';
  const tile = (label, value, extra) => h('div', { class: 'tile' }, h('span', { class: 'tile-label' }, label), h('strong', { class: 'tile-value' }, value), extra ? h('small', { class: 'muted' }, extra) : null);
  fill($('usage-tiles'),
    tile('Calls', num(total.requests), statuses),
    tile('Errors', num(total.errors)),
    tile('Refused', num(total.denied)),
    tile('Units', num(total.units)),
    tile('Latency p50', ms(total.latency_ms.p50)),
    tile('p95', ms(total.latency_ms.p95)),
    tile('p99', ms(total.latency_ms.p99)));
}

function charts(data) {
  const names = serviceOrder(Object.keys(data.series).filter((name) => name !== '*'));
  const points = (data.series['*'] || []).map((point, i) => {
    const values = {};
    for (const name of names) values[name] = (data.series[name][i] || {}).requests || 0;
    return { start: point.start, values };
  });
  const colors = colours(names);
  stackedBars($('chart-calls'), { points, names, colors, granularity: data.granularity, label: 'Calls over time by service' });
  fill($('legend-calls'), names.map((name) => h('li', {}, h('span', { class: 'swatch', 'data-color': name }), h('code', {}, name))));
  // Swatches are coloured through the CSSOM (allowed by the CSP), not style="".
  for (const swatch of $('legend-calls').querySelectorAll('.swatch')) swatch.style.background = colors[swatch.dataset.color];
  const latency = (data.series['*'] || []).map((point) => ({ start: point.start, values: point.latency_ms }));
  lines($('chart-latency'), { points: latency, series: PERCENTILES, granularity: data.granularity, label: 'Latency percentiles over time', format: (v) => `${Number(v.toPrecision(3))} ms` });
  fill($('legend-latency'), PERCENTILES.map((p) => h('li', {}, h('span', { class: `swatch swatch-${p.key}` }), p.label)));
}

function limitRow(limit, now) {
  const used = Math.min(limit.used, limit.limit);
  const name = limit.kind === 'window' ? `${limit.name} window` : limit.kind === 'quota' ? `${limit.name} quota` : 'requests in flight';
  const reset = limit.kind === 'concurrency' ? '' : ` · resets ${relative(limit.reset_at - now)} (${when(limit.reset_at)})`;
  const id = `meter-${limit.name}`;
  return h('div', { class: 'limit' },
    h('label', { for: id }, h('strong', {}, name), h('span', { class: 'muted' }, ` ${num(limit.used)} of ${num(limit.limit)} used${reset}`)),
    h('meter', { id, min: 0, max: limit.limit, value: used, low: limit.limit * 0.7, high: limit.limit * 0.9, optimum: 0 }, `${limit.used} of ${limit.limit}`));
}

function limitsPanel(data) {
  const box = $('usage-limits');
  if (!view.key) return fill(box, h('p', { class: 'muted' }, 'Choose a key to see its windows and quotas.'));
  if (!data.limits || !data.limits.length) return fill(box, h('p', { class: 'muted' }, 'No limits apply to this key.'));
  const now = Date.now() / 1000;
  return fill(box, data.limits.map((limit) => limitRow(limit, now)));
}

function inRange(entry, data) {
  return new Date(entry.at).getTime() / 1000 >= data.since;
}

function codesPanel(data) {
  // Refusals are counted in full by the usage records; other errors come from
  // the key's error log (its newest entries).
  const counts = new Map(Object.entries(data.total.reasons));
  for (const entry of view.errors.filter((e) => inRange(e, data))) {
    if (!(entry.code in data.total.reasons)) counts.set(entry.code, (counts.get(entry.code) || 0) + 1);
  }
  const rows = [...counts.entries()].sort((a, b) => b[1] - a[1]);
  if (!rows.length) return fill($('usage-codes'), h('p', { class: 'muted' }, 'No errors in this range.'));
  const max = Math.max(...rows.map((r) => r[1]));
  fill($('usage-codes'), h('ul', { class: 'hbars' }, rows.map(([code, count]) => {
    const bar = h('span', { class: 'hbar' });
    bar.style.width = `${Math.max(2, (count / max) * 100)}%`;
    return h('li', {}, h('code', {}, code), h('span', { class: 'hbar-track' }, bar), h('strong', {}, num(count)));
  })));
  return null;
}

function options(select, values) {
  const chosen = select.value;
  fill(select, h('option', { value: '' }, 'All'), [...values].sort().map((v) => h('option', { value: v }, v)));
  select.value = values.has(chosen) ? chosen : '';
}

export function renderLog() {
  const body = $('log-body');
  if (!view.key) {
    $('log-filters').hidden = true;
    return fill(body, h('tr', {}, h('td', { colspan: 7, class: 'muted empty-row' }, 'Choose a key to see its error log.')));
  }
  $('log-filters').hidden = false;
  const status = $('log-status').value;
  const code = $('log-code').value;
  const service = $('log-service').value;
  const text = $('log-search').value.trim().toLowerCase();
  const rows = view.errors.filter((e) =>
    (!status || String(e.status).startsWith(status)) && (!code || e.code === code) && (!service || e.service === service)
    && (!text || [e.route, e.message, e.request_id, e.method].join(' ').toLowerCase().includes(text)));
  fill(body, rows.map((e) => h('tr', {},
    h('td', { 'data-label': 'Time' }, when(e.at)),
    h('td', { 'data-label': 'Status' }, h('span', { class: `badge code-${String(e.status)[0]}xx` }, e.status)),
    h('td', { 'data-label': 'Code' }, h('code', {}, e.code)),
    h('td', { 'data-label': 'Route' }, h('code', {}, `${e.method} ${e.route}`)),
    h('td', { 'data-label': 'Service' }, e.service || '–'),
    h('td', { 'data-label': 'Message' }, e.message),
    h('td', { 'data-label': 'Request id', class: 'mono' }, e.request_id || '–'))));
  if (!rows.length) body.append(h('tr', {}, h('td', { colspan: 7, class: 'muted empty-row' }, view.errors.length ? 'No error matches.' : 'No errors logged.')));
  return null;
}

export async function loadUsage() {
  const seq = (view.seq += 1); // only the newest answer is drawn
  try {
    const range = { since: view.since, by: 'service' };
    let data;
    let errors;
    if (view.key) {
      const id = encodeURIComponent(view.key);
      [data, errors] = await Promise.all([
        api('GET', `/v1/keys/${id}/usage${q(range)}`),
        api('GET', `/v1/keys/${id}/errors${q({ limit: 200 })}`),
      ]);
    } else {
      data = await api('GET', `/v1/usage${q({ ...range, owner: state.me.admin ? $('usage-owner').value : null })}`);
      errors = { errors: [] };
    }
    if (seq !== view.seq) return;
    view.errors = errors.errors;
    view.data = data;
    tiles(data.total);
    charts(data);
    limitsPanel(data);
    codesPanel(data);
    options($('log-code'), new Set(view.errors.map((e) => e.code)));
    options($('log-service'), new Set(view.errors.map((e) => e.service).filter(Boolean)));
    renderLog();
    $('usage-updated').textContent = `Updated ${new Date().toLocaleTimeString()} · ${data.granularity} by ${data.granularity}`;
  } catch (error) {
    if (seq === view.seq) $('usage-updated').textContent = `Could not load usage: ${error.text || error.message}`;
  }
}

/** Show `id`'s usage the next time the panel loads. */
export function chooseKey(id) {
  view.key = id;
  renderKeyMenu();
}

export function initUsage() {
  $('usage-key').addEventListener('change', () => { view.key = $('usage-key').value; renderKeyMenu(); loadUsage(); });
  $('usage-owner').addEventListener('change', loadUsage);
  for (const radio of document.querySelectorAll('input[name="range"]')) {
    radio.addEventListener('change', () => { view.since = radio.value; loadUsage(); });
  }
  $('usage-refresh').addEventListener('click', loadUsage);
  for (const id of ['log-status', 'log-code', 'log-service', 'log-search']) {
    $(id).addEventListener(id === 'log-search' ? 'input' : 'change', renderLog);
  }
}
