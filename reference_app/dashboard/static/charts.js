// Small SVG charts drawn by hand: stacked bars and lines on a fixed viewBox that
// scales with the page. Each chart is role="img" with a text summary, and every
// bar carries a <title> with its numbers.

import { clear, compact, s, tick } from './util.js';

const W = 900;
const H = 220;
const M = { left: 44, right: 10, top: 10, bottom: 26 };
const PW = W - M.left - M.right;
const PH = H - M.top - M.bottom;

/** A round upper bound for an axis: 1, 2, 5 x 10^k. */
export function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) {
    if (value <= step * power) return step * power;
  }
  return 10 * power;
}

function frame(label, max, format) {
  const svg = s('svg', {
    viewBox: `0 0 ${W} ${H}`,
    role: 'img',
    'aria-label': label,
    class: 'chart-svg',
  });
  for (const fraction of [0, 0.5, 1]) {
    const y = M.top + PH - fraction * PH;
    svg.append(s('line', { x1: M.left, x2: W - M.right, y1: y, y2: y, class: 'grid' }));
    svg.append(s('text', { x: M.left - 6, y: y + 4, class: 'axis', 'text-anchor': 'end' }, format(max * fraction)));
  }
  return svg;
}

function xLabels(svg, points, granularity, step) {
  const count = Math.min(6, points.length);
  if (count === 0) return;
  const every = Math.max(1, Math.ceil(points.length / count));
  for (let i = 0; i < points.length; i += every) {
    const x = M.left + (i + 0.5) * step;
    svg.append(s('text', { x, y: H - 8, class: 'axis', 'text-anchor': 'middle' }, tick(points[i].start, granularity)));
  }
}

function empty(svg, text) {
  svg.append(s('text', { x: M.left + PW / 2, y: M.top + PH / 2, class: 'empty', 'text-anchor': 'middle' }, text));
}

/**
 * Bars stacked by series. points: [{start, values: {name: n}}]; names: draw order;
 * colors: name -> colour.
 */
export function stackedBars(container, { points, names, colors, granularity, label }) {
  const totals = points.map((p) => names.reduce((sum, name) => sum + (p.values[name] || 0), 0));
  const sum = totals.reduce((a, b) => a + b, 0);
  const max = niceMax(Math.max(0, ...totals));
  const svg = frame(`${label}: ${sum} calls in all`, max, compact);
  svg.dataset.total = String(sum);
  const step = points.length ? PW / points.length : PW;
  const width = Math.max(1, step * 0.78);
  points.forEach((point, i) => {
    if (!totals[i]) return;
    const group = s('g', { class: 'bar' });
    let y = M.top + PH;
    const parts = [];
    for (const name of names) {
      const value = point.values[name] || 0;
      if (!value) continue;
      const height = (value / max) * PH;
      y -= height;
      group.append(s('rect', { x: M.left + i * step + (step - width) / 2, y, width, height: Math.max(height, 0.5), fill: colors[name] }));
      parts.push(`${name}: ${value}`);
    }
    group.append(s('title', {}, `${tick(point.start, granularity)} — ${totals[i]} calls (${parts.join(', ')})`));
    svg.append(group);
  });
  if (!sum) empty(svg, 'No calls in this range');
  xLabels(svg, points, granularity, step);
  clear(container).append(svg);
  return svg;
}

/** Lines with gaps where a value is null. series: [{key, color, label}]. */
export function lines(container, { points, series, granularity, label, format }) {
  const values = points.flatMap((p) => series.map((line) => p.values[line.key])).filter((v) => v !== null && v !== undefined);
  const max = niceMax(Math.max(0, ...values));
  const svg = frame(label, max, format);
  const step = points.length ? PW / points.length : PW;
  const at = (i, v) => [M.left + (i + 0.5) * step, M.top + PH - (v / max) * PH];
  for (const line of series) {
    let path = '';
    let open = false;
    const dots = s('g', { fill: line.color, class: `dots dots-${line.key}` });
    points.forEach((point, i) => {
      const v = point.values[line.key];
      if (v === null || v === undefined) {
        open = false;
        return;
      }
      const [x, y] = at(i, v);
      path += `${open ? 'L' : 'M'}${x.toFixed(1)},${y.toFixed(1)}`;
      open = true;
      dots.append(s('circle', { cx: x, cy: y, r: 2.6 }, s('title', {}, `${tick(point.start, granularity)} ${line.label}: ${format(v)}`)));
    });
    if (path) svg.append(s('path', { d: path, stroke: line.color, class: 'line', fill: 'none' }));
    svg.append(dots);
  }
  if (!values.length) empty(svg, 'No latency recorded in this range');
  xLabels(svg, points, granularity, step);
  clear(container).append(svg);
  return svg;
}
