// Filters, copy buttons and the refresh of pgwarden's advice page; nothing else. All the
// text it moves is the server's already escaped markup or a data attribute's value,
// never parsed as HTML from elsewhere.
(function () {
  "use strict";
  var form = document.getElementById("filters");
  var FILTERS = ["application", "rule", "severity"];

  function chosen() {
    var values = {};
    FILTERS.forEach(function (name) { values[name] = form.elements[name].value; });
    return values;
  }

  function matches(el, f) {
    return (!f.application || el.dataset.app === f.application) &&
      (!f.rule || el.dataset.rule === f.rule) &&
      (!f.severity || el.dataset.severity === f.severity);
  }

  function apply() {
    var f = chosen();
    var shown = 0;
    document.querySelectorAll("details.advice").forEach(function (el) {
      el.hidden = !matches(el, f);
      if (!el.hidden) { shown += 1; }
    });
    document.querySelectorAll("section.group").forEach(function (group) {
      group.hidden = !group.querySelector("details.advice:not([hidden])");
    });
    document.querySelectorAll("tr.statement").forEach(function (row) {
      row.hidden = !!f.application && row.dataset.app !== f.application;
    });
    var none = document.getElementById("no-match");
    if (none) { none.hidden = shown > 0; }
    var query = new URLSearchParams();
    FILTERS.forEach(function (name) { if (f[name]) { query.set(name, f[name]); } });
    var search = query.toString();
    try {
      history.replaceState(null, "", search ? "?" + search : location.pathname);
    } catch (e) { /* a file opened from disk may refuse: the filter still applies */ }
  }

  form.addEventListener("change", apply);
  form.addEventListener("submit", function (event) { event.preventDefault(); apply(); });
  form.querySelector("button.apply").hidden = true;  // the selects apply at once

  function copyByHand(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.appendChild(area);
    area.select();
    var done = false;
    try { done = document.execCommand("copy"); } catch (e) { done = false; }
    area.remove();
    return done;
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button.copy");
    if (!button) { return; }
    var text = button.dataset.copy;
    function said(ok) {
      button.textContent = ok ? "Copied" : "Select and copy by hand";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(
        function () { said(true); },
        function () { said(copyByHand(text)); });
    } else {
      said(copyByHand(text));
    }
  });

  var status = document.getElementById("refresh-status");
  function refresh() {
    if (document.hidden) { return; }
    var query = new URLSearchParams(location.search);
    query.set("fragment", "1");  // the filters and content, without style or script
    // from the origin, which never holds the user:password@ a typed address may carry
    fetch(location.origin + location.pathname + "?" + query.toString(),
      { headers: { Accept: "text/html" }, cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        var content = fresh.getElementById("content");
        if (!content) { throw new Error("not an advice page"); }
        var open = {};
        document.querySelectorAll("details[open]").forEach(function (d) { open[d.id] = true; });
        content.querySelectorAll("details").forEach(function (d) { d.open = !!open[d.id]; });
        FILTERS.forEach(function (name) {
          var select = form.elements[name];
          var value = select.value;
          var options = fresh.querySelectorAll("#filters select[name=" + name + "] option");
          select.replaceChildren.apply(select, Array.prototype.map.call(options, function (o) {
            return document.adoptNode(o);
          }));
          select.value = value;
          if (select.value !== value) { select.value = ""; }
        });
        document.getElementById("content").replaceWith(document.adoptNode(content));
        apply();
        status.textContent = "updated " + new Date().toLocaleTimeString();
      })
      .catch(function (error) {
        status.textContent = "refresh failed (" + error.message + "); retrying";
      });
  }

  var every = parseInt(document.body.dataset.refresh || "0", 10);
  if (every > 0) {
    setInterval(refresh, every * 1000);
    status.textContent = "refreshes every " + every + " s";
  }
  apply();
}());
