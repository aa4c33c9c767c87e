// The console's own script (the CSP allows no inline script): ticking "select all" ticks
// every order on the page. Delegated from the document, so it outlives htmx's swaps.
document.addEventListener("change", function (event) {
  var all = event.target;
  if (all.id !== "select-all") return;
  document.querySelectorAll('input[name="order_id"][form="bulk"]').forEach(function (box) {
    box.checked = all.checked;
  });
});
