// The console's one script: swap in the live part of a page as the server
// sends it (SSE), and say on the page whether the stream is connected.
// Without it the pages still work; they just do not move.
(function () {
  "use strict";
  var target = document.querySelector("[data-live]");
  if (!target || !window.EventSource) return;
  var state = document.getElementById("live-state");
  var source = new EventSource(target.getAttribute("data-live"));
  function mark(up) {
    if (state) { state.classList.toggle("down", !up); state.textContent = up ? "live" : "reconnecting"; }
  }
  source.addEventListener("open", function () { mark(true); });
  source.addEventListener("error", function () { mark(false); });
  source.addEventListener("html", function (event) {
    // Keep an open <details> open across a refresh.
    var open = Array.prototype.map.call(target.querySelectorAll("details[open]"), function (d, i) { return i; });
    target.innerHTML = event.data;
    var all = target.querySelectorAll("details");
    open.forEach(function (i) { if (all[i]) all[i].open = true; });
    mark(true);
  });
})();
