// The console's only script: the one-time key dialog and its copy button.
// Everything works without it; it adds a modal dialog and clipboard copying.
"use strict";

function announce(status, text) {
  if (status) {
    status.textContent = text;
  }
}

function copyFrom(button) {
  const input = document.getElementById(button.dataset.copy);
  const status = document.getElementById(button.getAttribute("aria-describedby"));
  if (!input) {
    return;
  }
  input.focus();
  input.select();
  const done = () => announce(status, "Copied to the clipboard.");
  const manual = () => announce(status, "Press Ctrl+C (or ⌘C) to copy the selected key.");
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(input.value).then(done, () => {
      try {
        document.execCommand("copy") ? done() : manual();
      } catch (e) {
        manual();
      }
    });
  } else {
    try {
      document.execCommand("copy") ? done() : manual();
    } catch (e) {
      manual();
    }
  }
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", () => copyFrom(button));
  }
  // The server renders the dialog open; make it modal so focus stays inside it.
  const dialog = document.querySelector("dialog.once[open]");
  if (dialog && typeof dialog.showModal === "function") {
    dialog.close();
    dialog.showModal();
    const input = dialog.querySelector("input.secret");
    if (input) {
      input.focus();
      input.select();
    }
  }
});
