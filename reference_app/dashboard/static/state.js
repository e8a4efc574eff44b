// What the page knows, shared by the panels: the signed-in key, the keys it may
// see, the plans and the service catalogue. Never a secret.

export const state = {
  me: null, // {id, name, owner, scopes, plan, admin}
  keys: [],
  plans: [],
  catalogue: [], // [{scope, description}] from /openapi.json
  lastUsed: new Map(), // key id -> epoch seconds, derived from usage when the API has none
};

export const EXPIRING_DAYS = 7;

/** active, expiring (soon), expired or revoked. */
export function statusOf(key, now = Date.now()) {
  if (key.status !== 'active') return key.status;
  if (key.expires_at && new Date(key.expires_at).getTime() - now < EXPIRING_DAYS * 86400000) return 'expiring';
  return 'active';
}

export const STATUS_TEXT = {
  active: 'active',
  expiring: 'expiring soon',
  expired: 'expired',
  revoked: 'revoked',
};

export function owners() {
  const names = new Set(state.keys.map((k) => k.owner).filter(Boolean));
  if (state.me && state.me.owner) names.add(state.me.owner);
  return [...names].sort();
}

export function keyLabel(key) {
  return `${key.name} (${key.hint})`;
}
