// logbook console: small progressive enhancement on top of server-rendered
// pages (every page works without it). No inline script: CSP is 'self'.
"use strict";
document.addEventListener("change", function (e) {
  var t = e.target;
  // Selects in an auto-submitting filter form apply at once.
  if (t instanceof HTMLSelectElement && t.form && t.form.classList.contains("autosubmit")) {
    t.form.requestSubmit();
  }
});
