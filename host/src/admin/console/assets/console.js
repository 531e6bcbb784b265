// hookmesh console: pages that show live state reload themselves every
// data-refresh seconds, unless the operator is typing or selecting.
"use strict";
(function () {
  var seconds = Number(document.body.dataset.refresh);
  if (!seconds) {
    return;
  }
  setInterval(function () {
    var active = document.activeElement;
    var busy = active && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName);
    var selecting = String(window.getSelection() || "").length > 0;
    if (!busy && !selecting && document.visibilityState === "visible") {
      window.location.reload();
    }
  }, seconds * 1000);
})();
