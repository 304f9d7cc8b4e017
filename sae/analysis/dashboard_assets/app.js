// SAE dashboard: search the latents table by label, description or number (no libraries; works from file://).
(function () {
  "use strict";
  var box = document.getElementById("search");
  var table = document.getElementById("latents");
  if (!box || !table) { return; }
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var count = document.getElementById("count");
  function apply() {
    var words = box.value.toLowerCase().split(/\s+/).filter(function (w) { return w.length > 0; });
    var shown = 0;
    rows.forEach(function (row) {
      var text = row.getAttribute("data-search") || "";
      var hit = words.every(function (w) { return text.indexOf(w) >= 0; });
      row.classList.toggle("hidden", !hit);
      if (hit) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " latents";
  }
  box.addEventListener("input", apply);
  var q = new URLSearchParams(window.location.search).get("q");
  if (q) { box.value = q; }
  apply();
})();
