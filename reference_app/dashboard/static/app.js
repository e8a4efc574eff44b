// The dashboard's entry point: sign-in, tabs, and the polling that keeps the
// visible panel fresh without a reload.

import { api, session, whenRefused } from './api.js';
import { initAlerts, loadAlerts, loadDeliveries, prepareAlerts } from './alerts.js';
import { initKeys, loadKeys, onKeysChanged } from './keys.js';
import { initReveal } from './reveal.js';
import { covers, loadCatalogue } from './scopes.js';
import { state } from './state.js';
import { chooseKey, initUsage, loadUsage, renderKeyMenu } from './usage.js';
import { $, toast } from './util.js';

const POLL_MS = 5000;
const TABS = ['keys', 'usage', 'alerts'];
let current = 'keys';

function selectTab(name, { focus = false } = {}) {
  current = name;
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    const on = tab === name;
    button.setAttribute('aria-selected', String(on));
    button.tabIndex = on ? 0 : -1;
    $(`panel-${tab}`).hidden = !on;
  }
  if (focus) $(`tab-${name}`).focus();
  if (history.replaceState) history.replaceState(null, '', `#${name}`);
  if (name === 'usage') loadUsage();
  else if (name === 'alerts') loadAlerts();
}

function refresh() {
  if (!state.me || document.visibilityState !== 'visible') return;
  if (current === 'usage' && $('usage-live').checked) loadUsage();
  else if (current === 'alerts') loadDeliveries();
}

function initTabs() {
  const tabs = $('tabs');
  tabs.addEventListener('click', (event) => {
    const button = event.target.closest('[role="tab"]');
    if (button) selectTab(button.id.replace('tab-', ''));
  });
  // Arrow keys move between tabs (WAI-ARIA tabs pattern); Tab goes to the panel.
  tabs.addEventListener('keydown', (event) => {
    const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -Infinity, End: Infinity };
    if (!(event.key in moves)) return;
    event.preventDefault();
    const at = TABS.indexOf(current);
    const step = moves[event.key];
    const next = Number.isFinite(step) ? (at + step + TABS.length) % TABS.length : step < 0 ? 0 : TABS.length - 1;
    selectTab(TABS[next], { focus: true });
  });
}

function signOut(message) {
  session.clear();
  state.me = null;
  if (message) sessionStorage.setItem('keyguard.dashboard.notice', message);
  location.replace('/dashboard');
}

async function start(me) {
  state.me = { ...me, admin: covers(me.scopes, 'admin') };
  $('signin').hidden = true;
  $('who').hidden = false;
  $('tabs').hidden = false;
  $('who-name').textContent = `${me.name}${me.owner ? ` · ${me.owner}` : ''}`;
  $('who-role').textContent = state.me.admin ? 'admin: every owner' : 'self-service';
  document.body.classList.toggle('is-admin', state.me.admin);
  const [plans, catalogue] = await Promise.all([api('GET', '/v1/plans'), loadCatalogue()]);
  state.plans = plans.data;
  state.catalogue = catalogue;
  prepareAlerts();
  await loadKeys();
  const wanted = location.hash.slice(1);
  selectTab(TABS.includes(wanted) ? wanted : 'keys');
}

async function signIn(event) {
  event.preventDefault();
  const input = $('signin-key');
  const key = input.value.trim();
  $('signin-error').textContent = '';
  try {
    const me = await api('GET', '/v1/whoami', undefined, key);
    session.set(key);
    input.value = '';
    await start(me);
    $('main').focus();
  } catch (error) {
    const why = {
      401: 'This key was refused: it is unknown, expired or revoked.',
      403: 'This key cannot use the key API: it needs the keys:self scope.',
    };
    $('signin-error').textContent = why[error.status] || error.text || error.message;
    input.focus();
  }
}

function init() {
  initReveal();
  initTabs();
  initKeys({ showUsage: (id) => { chooseKey(id); selectTab('usage'); } });
  initUsage();
  initAlerts();
  onKeysChanged(renderKeyMenu);
  $('signin-form').addEventListener('submit', signIn);
  $('sign-out').addEventListener('click', () => signOut());
  whenRefused(() => signOut('The server refused your key (revoked or expired?): sign in again.'));
  document.addEventListener('visibilitychange', refresh);
  setInterval(refresh, POLL_MS);
  const notice = sessionStorage.getItem('keyguard.dashboard.notice');
  if (notice) {
    sessionStorage.removeItem('keyguard.dashboard.notice');
    $('signin-error').textContent = notice;
  }
  const key = session.key;
  if (!key) {
    $('signin-key').focus();
    return;
  }
  api('GET', '/v1/whoami').then(start).catch((error) => {
    if (error.status !== 401) toast(error.text || error.message);
  });
}

init();
