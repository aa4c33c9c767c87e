// The console's own script (the CSP allows no inline script): ticking "select all" ticks
// every order on the page. Delegated from the document, so it outlives htmx's swaps.
document.addEventListener("change", function (event) {
  var all = event.target;
  if (all.id !== "select-all") return;
  document.querySelectorAll('input[name="order_id"][form="bulk"]').forEach(function (box) {
    box.checked = all.checked;
  });
});

// htmx 2 swaps no 4xx/5xx answer, so an error the console answers to an htmx request (a
// refused filter or command, a stale security token, a failure) would be dropped without a
// word. An answer that is the very element its request was to replace (same id: the count's
// "Could not count: ...") is swapped as a 200 would be; any other is said in one line in the
// page's error bar, as text (never parsed into the page); a request that could not be sent
// too. The bar goes once the same element's request succeeds, or on Dismiss. An expired
// session is answered with HX-Redirect to sign in (htmx follows it); a 401 is sent there too.
(function () {
  var shownFor = null;

  function bar() { return document.getElementById("request-error"); }

  function show(line, elt) {
    var box = bar();
    if (!box) return;
    box.querySelector(".message").textContent = line;
    box.hidden = false;
    shownFor = elt;
  }

  function hide() {
    var box = bar();
    if (box) box.hidden = true;
    shownFor = null;
  }

  function isHtml(xhr) {
    return (xhr.getResponseHeader("Content-Type") || "").indexOf("text/html") === 0;
  }

  function parsed(xhr) {  // inert: a parsed document runs no script and loads nothing
    return new DOMParser().parseFromString(xhr.responseText || "", "text/html");
  }

  function oneLine(xhr) {
    var text = xhr.responseText || "";
    if (isHtml(xhr)) {
      var doc = parsed(xhr);
      var said = doc.querySelector("[role=alert], .alert.bad, .error");
      text = (said || doc.body).textContent || "";
    } else if ((xhr.getResponseHeader("Content-Type") || "").indexOf("text/plain") !== 0) {
      text = "";
    }
    text = text.replace(/\s+/g, " ").trim();
    if (text.length > 300) text = text.slice(0, 299) + "…";
    var status = "HTTP " + xhr.status + (xhr.statusText ? " " + xhr.statusText : "");
    return text ? (xhr.status >= 500 ? text + " (" + status + ")" : text)
                : "The console answered " + status + ".";
  }

  document.addEventListener("htmx:beforeSwap", function (event) {
    var detail = event.detail, xhr = detail.xhr, target = detail.target;
    if (!detail.isError) return;
    if (xhr.status === 401) {
      detail.shouldSwap = false;
      detail.isError = false;
      window.location.assign("/sign-in?next=" +
        encodeURIComponent(window.location.pathname + window.location.search));
      return;
    }
    if (target && target.id && isHtml(xhr)) {
      var root = parsed(xhr).body.firstElementChild;
      if (root && root.id === target.id) {
        detail.shouldSwap = true;
        detail.isError = false;
      }
    }
  });

  document.addEventListener("htmx:responseError", function (event) {
    show(oneLine(event.detail.xhr), event.detail.elt);
  });

  function unreachable(event) {
    show("The console did not answer (network down, or it is restarting): try again in a"
         + " moment.", event.detail.elt);
  }
  document.addEventListener("htmx:sendError", unreachable);
  document.addEventListener("htmx:timeout", unreachable);

  document.addEventListener("htmx:afterRequest", function (event) {
    if (event.detail.successful && event.detail.elt === shownFor) hide();
  });

  document.addEventListener("click", function (event) {
    if (event.target.closest && event.target.closest("#request-error .dismiss")) hide();
  });
})();
