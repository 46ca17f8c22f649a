// Status page: filter and paginate the accounts table, count token expiry down, and keep
// sessions, listeners and recent logins current by polling /live.json. Plain DOM, no
// dependencies, served from this listener (the page works offline under a strict CSP); text
// goes in through textContent only, so nothing the server relays can become markup.
"use strict";
(function () {
  var PAGE = 50;
  var table = document.getElementById("accounts");
  var filter = document.getElementById("filter");
  var nav = document.getElementById("pages");
  if (!table || !filter || !nav) return;
  var rows = Array.prototype.slice.call(table.tBodies[0].rows);
  var page = 0;

  function matching() {
    var q = filter.value.trim().toLowerCase();
    return rows.filter(function (r) {
      return !q || (r.getAttribute("data-search") || "").indexOf(q) >= 0;
    });
  }

  function render() {
    var shown = matching();
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    page = Math.min(page, pages - 1);
    rows.forEach(function (r) { r.hidden = true; });
    shown.slice(page * PAGE, (page + 1) * PAGE).forEach(function (r) { r.hidden = false; });
    nav.textContent = "";
    var info = document.createElement("span");
    info.textContent = shown.length + " of " + rows.length + " accounts, page " + (page + 1) + " of " + pages + " ";
    nav.appendChild(info);
    [["Previous", -1], ["Next", 1]].forEach(function (b) {
      var button = document.createElement("button");
      button.type = "button";
      button.textContent = b[0];
      button.disabled = page + b[1] < 0 || page + b[1] >= pages;
      button.addEventListener("click", function () { page += b[1]; render(); });
      nav.appendChild(button);
    });
  }

  function countdown() {
    var now = Date.now() / 1000;
    document.querySelectorAll("[data-expires]").forEach(function (cell) {
      var left = Math.round(Number(cell.getAttribute("data-expires")) - now);
      if (left <= 0) { cell.textContent = "expired (refreshed on next use)"; return; }
      var m = Math.floor(left / 60), s = left % 60;
      cell.textContent = "in " + (m > 0 ? m + " min " : "") + s + " s";
    });
  }

  function sessionsText(open) {
    var parts = Object.keys(open || {}).sort().map(function (p) { return p + " " + open[p]; });
    return parts.length ? parts.join(", ") : "none";
  }

  function fillRows(tbody, rows) {
    tbody.textContent = "";
    rows.forEach(function (cells) {
      var tr = document.createElement("tr");
      cells.forEach(function (text) {
        var td = document.createElement("td");
        td.textContent = text;
        tr.appendChild(td);
      });
      tbody.appendChild(tr);
    });
  }

  function show(live) {
    document.querySelectorAll("[data-sessions]").forEach(function (cell) {
      cell.textContent = sessionsText(live.sessions[cell.getAttribute("data-sessions")]);
    });
    var listeners = document.getElementById("listeners");
    if (listeners) {
      listeners.textContent = "";
      live.listeners.forEach(function (l) {
        var li = document.createElement("li");
        li.textContent = l;
        listeners.appendChild(li);
      });
    }
    var events = document.getElementById("events");
    if (events) {
      fillRows(events.tBodies[0], live.events.map(function (e) {
        return [e.time, e.user, e.protocol, e.peer, e.result];
      }));
    }
  }

  function poll() {
    fetch("/live.json", { cache: "no-store" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (live) { if (live) show(live); })
      .catch(function () { /* the next poll tries again */ });
  }

  filter.addEventListener("input", function () { page = 0; render(); });
  render();
  countdown();
  setInterval(countdown, 1000);
  setInterval(poll, 3000);
})();
