// Showing a secret once: a new key, a rotated key, a webhook signing secret.
//
// The secret is moved out of the API answer into one read-only field (a property,
// never an attribute, so it is not in the serialised page) and the answer's own
// copy is dropped. Closing the dialog empties the field: no reference to the secret
// is left in the page or in this code, so it is gone as soon as the garbage
// collector runs (JavaScript cannot overwrite a string in place).

import { $ } from './util.js';

let dialog;
let field;

function wipe() {
  field.value = '';
  field.setSelectionRange(0, 0);
  $('reveal-copied').textContent = '';
}

async function copy() {
  try {
    await navigator.clipboard.writeText(field.value);
    $('reveal-copied').textContent = 'Copied to the clipboard.';
  } catch {
    field.focus();
    field.select();
    const done = document.execCommand && document.execCommand('copy');
    $('reveal-copied').textContent = done ? 'Copied to the clipboard.' : 'Selected: press Ctrl+C (⌘C) to copy.';
  }
}

export function initReveal() {
  dialog = $('dlg-reveal');
  field = $('reveal-value');
  $('reveal-copy').addEventListener('click', copy);
  $('reveal-done').addEventListener('click', () => {
    wipe(); // at once: the close event comes a task later
    dialog.close();
  });
  dialog.addEventListener('close', wipe);
  // Escape would lose the secret by accident: say how to close instead.
  dialog.addEventListener('cancel', (event) => {
    event.preventDefault();
    $('reveal-copied').textContent = 'Copy the secret, then press “I have stored it” to close.';
    $('reveal-done').focus();
  });
}

/**
 * Show `holder[field]` once (default `holder.key`) and delete it from `holder`.
 */
export function reveal(holder, title, { label = 'Secret', name = 'key' } = {}) {
  $('dlg-reveal-title').textContent = title;
  $('reveal-label').textContent = label;
  field.value = holder[name];
  holder[name] = null;
  delete holder[name];
  $('reveal-copied').textContent = '';
  dialog.showModal();
  field.focus();
  field.select();
}
