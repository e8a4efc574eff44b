// The service catalogue, read from the server's public OpenAPI document (the
// OAuth scheme lists every scope), grouped as text, image, audio and chat, and the
// scope picker of the key form.

import { api } from './api.js';
import { h } from './util.js';

export const GROUPS = [
  { name: 'text', title: 'Text' },
  { name: 'image', title: 'Image' },
  { name: 'audio', title: 'Audio' },
  { name: 'chat', title: 'Chat' },
];
const MANAGEMENT = ['keys:self', 'admin'];

export async function loadCatalogue() {
  const doc = await api('GET', '/openapi.json', undefined, null);
  const scopes = doc?.components?.securitySchemes?.oauth2?.flows?.clientCredentials?.scopes || {};
  return Object.entries(scopes).map(([scope, description]) => ({ scope, description }));
}

/** Whether a key holding `mine` may grant `scope` (the server's own rule). */
export function covers(mine, scope) {
  if (mine.includes('*') || mine.includes(scope)) return true;
  const family = scope.split(':')[0];
  return mine.includes(`${family}:*`);
}

/** The checkboxes of one form: build(), set(scopes), read(). */
export class ScopePicker {
  constructor(container, { catalogue, mine, admin }) {
    this.container = container;
    this.mine = mine;
    this.admin = admin;
    this.catalogue = catalogue;
    this.kept = [];
    this.boxes = new Map();
    this.all = new Map();
    this.build();
  }

  grantable(scope) {
    return this.admin || covers(this.mine, scope);
  }

  box(scope, text, id) {
    const input = h('input', { type: 'checkbox', id, value: scope, disabled: !this.grantable(scope) });
    const label = h('label', { for: id, class: 'check' }, input, ' ', text);
    return [input, label];
  }

  build() {
    const parts = [];
    for (const group of GROUPS) {
      const members = this.catalogue.filter((c) => c.scope.startsWith(`${group.name}:`));
      if (!members.length) continue;
      const [all, allLabel] = this.box(`${group.name}:*`, h('span', {}, `Every ${group.title.toLowerCase()} service `, h('code', {}, `${group.name}:*`)), `scope-${group.name}-all`);
      all.addEventListener('change', () => this.sync());
      this.all.set(group.name, all);
      const items = members.map((c) => {
        const [input, label] = this.box(c.scope, h('code', {}, c.scope), `scope-${c.scope.replace(':', '-')}`);
        this.boxes.set(c.scope, input);
        return label;
      });
      parts.push(h('fieldset', { class: 'scope-group' }, h('legend', {}, group.title), allLabel, h('div', { class: 'checks' }, items)));
    }
    const manage = MANAGEMENT.filter((scope) => scope !== 'admin' || this.admin).map((scope) => {
      const text = scope === 'admin' ? 'every owner’s keys' : 'its own owner’s keys';
      const [input, label] = this.box(scope, h('span', {}, h('code', {}, scope), ` (manage ${text})`), `scope-${scope.replace(':', '-')}`);
      this.boxes.set(scope, input);
      return label;
    });
    parts.push(h('fieldset', { class: 'scope-group' }, h('legend', {}, 'Key API'), h('div', { class: 'checks' }, manage)));
    this.note = h('p', { class: 'help', hidden: true });
    parts.push(this.note);
    this.container.replaceChildren(...parts);
  }

  sync() {
    for (const [name, all] of this.all) {
      for (const [scope, input] of this.boxes) {
        if (!scope.startsWith(`${name}:`)) continue;
        if (all.checked) input.checked = true;
        input.disabled = all.checked || !this.grantable(scope);
      }
    }
  }

  set(scopes) {
    const given = new Set(scopes);
    for (const input of [...this.boxes.values(), ...this.all.values()]) input.checked = given.has(input.value);
    this.kept = scopes.filter((scope) => !this.boxes.has(scope) && !this.all.has(scope.split(':')[0]) && scope !== '*');
    if (given.has('*')) {
      for (const all of this.all.values()) all.checked = true;
      this.kept.push('*');
    }
    this.note.hidden = !this.kept.length;
    this.note.textContent = this.kept.length ? `Also keeps: ${this.kept.join(', ')}` : '';
    this.sync();
  }

  read() {
    const chosen = [...this.kept];
    for (const [name, all] of this.all) {
      if (all.checked) chosen.push(`${name}:*`);
    }
    for (const [scope, input] of this.boxes) {
      const family = scope.split(':')[0];
      if (input.checked && !(this.all.get(family) && this.all.get(family).checked)) chosen.push(scope);
    }
    return [...new Set(chosen)];
  }
}
