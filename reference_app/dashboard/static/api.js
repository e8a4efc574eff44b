// The server's public API, called exactly as any client calls it: same paths, the
// signed-in key as a bearer token. The key lives in this tab's sessionStorage only.

const STORE = 'keyguard.dashboard.key';

export const session = {
  get key() {
    return sessionStorage.getItem(STORE);
  },
  set(key) {
    sessionStorage.setItem(STORE, key);
  },
  clear() {
    sessionStorage.removeItem(STORE);
  },
};

export class ApiError extends Error {
  constructor(status, code, message, param) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }

  /** One line for a person: the server's message, and the field it names. */
  get text() {
    return this.param ? `${this.message} (${this.param})` : this.message;
  }
}

let onUnauthorized = () => {};
/** What to do when the server refuses the signed-in key (revoked, expired). */
export function whenRefused(handler) {
  onUnauthorized = handler;
}

export async function api(method, path, body, key = session.key) {
  const headers = { Accept: 'application/json' };
  if (key) headers.Authorization = `Bearer ${key}`;
  const init = { method, headers, cache: 'no-store', credentials: 'omit', referrerPolicy: 'no-referrer' };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'network_error', 'The server could not be reached.');
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    const failure = new ApiError(
      response.status,
      error.code || 'http_error',
      error.message || `The server answered ${response.status}.`,
      error.param,
    );
    if (response.status === 401 && key === session.key) onUnauthorized(failure);
    throw failure;
  }
  return data;
}

/** Every page of a cursor-paged list (at most `pages` pages). */
export async function listAll(path, pages = 20) {
  const items = [];
  let cursor = null;
  for (let i = 0; i < pages; i += 1) {
    const sep = path.includes('?') ? '&' : '?';
    const url = cursor ? `${path}${sep}after=${encodeURIComponent(cursor)}` : path;
    const page = await api('GET', url);
    items.push(...page.data);
    cursor = page.next_cursor;
    if (!cursor) break;
  }
  return items;
}

export const q = (params) => {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== '') search.set(name, value);
  }
  const text = search.toString();
  return text ? `?${text}` : '';
};
