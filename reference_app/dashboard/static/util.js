// DOM and formatting helpers. Every text goes in through textContent or an
// attribute value, never as HTML source, so nothing from the API is ever parsed
// as markup.

const SVG_NS = 'http://www.w3.org/2000/svg';

function build(el, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on') && typeof value === 'function') {
      el.addEventListener(name.slice(2), value);
    } else if (name === 'class') {
      el.setAttribute('class', value);
    } else {
      el.setAttribute(name, value === true ? '' : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** An HTML element: h('td', {class: 'x'}, 'text', otherNode). */
export function h(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

/** An SVG element, same shape as h(). */
export function s(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

export const $ = (id) => document.getElementById(id);

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
  return el;
}

export function fill(el, ...children) {
  clear(el);
  return build(el, {}, children);
}

const NUM = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
export const num = (n) => (n === null || n === undefined ? '–' : NUM.format(n));
export const ms = (n) => (n === null || n === undefined ? '–' : `${NUM.format(n)} ms`);

export function compact(n) {
  if (n >= 1e6) return `${NUM.format(n / 1e6)}M`;
  if (n >= 1e3) return `${NUM.format(n / 1e3)}k`;
  return NUM.format(n);
}

const DATE = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });
const TIME = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const DAY = new Intl.DateTimeFormat(undefined, { month: 'short', day: 'numeric' });

/** A moment (ISO text or epoch seconds) as local date and time. */
export function when(value) {
  if (value === null || value === undefined) return '–';
  const date = typeof value === 'number' ? new Date(value * 1000) : new Date(value);
  return Number.isNaN(date.getTime()) ? '–' : DATE.format(date);
}

export function tick(epochSeconds, granularity) {
  const date = new Date(epochSeconds * 1000);
  return granularity === 'day' ? DAY.format(date) : TIME.format(date);
}

/** "in 3 min", "2 h ago": a distance from now in seconds, rounded. */
export function relative(seconds) {
  const abs = Math.abs(seconds);
  let text;
  if (abs < 60) text = `${Math.round(abs)} s`;
  else if (abs < 3600) text = `${Math.round(abs / 60)} min`;
  else if (abs < 86400) text = `${NUM.format(abs / 3600)} h`;
  else text = `${NUM.format(abs / 86400)} d`;
  return seconds >= 0 ? `in ${text}` : `${text} ago`;
}

let toastTimer = 0;
/** A short message in the polite live region. */
export function toast(text) {
  const el = $('toast');
  el.textContent = text;
  el.classList.add('show');
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => el.classList.remove('show'), 4000);
}

/** "80, 100" -> [80, 100]; throws on anything that is not a positive number. */
export function numbers(text) {
  const parts = text.split(/[\s,;]+/).filter(Boolean);
  return parts.map((part) => {
    const value = Number(part);
    if (!Number.isFinite(value) || value <= 0) throw new Error(`"${part}" is not a positive number`);
    return value;
  });
}
