// SAE dashboard: the latents table (index.html) and the latent page (latent.html#123), drawn from the data/
// scripts (sae/analysis/dashboard_data.py documents them). No libraries, no fetch: works opened from file://.
// Every text from the data goes through textContent, never innerHTML.
(function () {
  "use strict";
  var meta = null, index = null, vocab = null, shards = {}, loading = {};
  window.__meta = function (m) { meta = m; };
  window.__index = function (d) { index = d; };
  window.__vocab = function (v) { vocab = v; };
  window.__shard = function (s, recs) { shards[s] = recs; };

  function el(tag, attrs, kids) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") { e.textContent = attrs[k]; } else if (k === "cls") { e.className = attrs[k]; }
      else { e.setAttribute(k, attrs[k]); }
    });
    (kids || []).forEach(function (c) { if (c) { e.appendChild(c); } });
    return e;
  }
  function fmt(v) {  // as charts.fmt in Python: 3 significant digits, thousands separators for big numbers
    if (v === null || v === undefined || !isFinite(v)) { return "-"; }
    var a = Math.abs(v);
    if (Number.isInteger(v) && a >= 1 && a < 1e9) { return v.toLocaleString("en-US"); }
    if (a >= 100 && a < 1e6) { return Math.round(v).toLocaleString("en-US"); }
    if (a === 0 || (a >= 1e-3 && a < 100)) { return String(Number(v.toPrecision(3))); }
    return v.toExponential(2);
  }
  var ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_";
  function ids(s, width) {
    var w = width || meta.width, out = [];
    for (var i = 0; i < s.length; i += w) {
      var v = 0;
      for (var j = 0; j < w; j++) { v = v * 64 + ALPHABET.indexOf(s.charAt(i + j)); }
      out.push(v);
    }
    return out;
  }
  function piece(id) {
    var t = vocab && id < vocab.length ? vocab[id] : "<" + id + ">";
    return t.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u00a0";
  }

  // ---- index.html: the latents table --------------------------------------------------------------------------
  function indexPage(table) {
    var n = index.freq.length, labels = index.labels, box = document.getElementById("search");
    var count = document.getElementById("count"), more = document.getElementById("more");
    var body = table.tBodies[0], PAGE = 500, limit = PAGE, sortKey = "latent", sortDir = 1, rows = [];
    function lab(l) { return labels[l] || ["", "", null, null]; }
    function value(l, key) {
      if (key === "latent") { return l; }
      if (key === "label") { return lab(l)[0].toLowerCase(); }
      if (key === "freq") { return index.freq[l]; }
      if (key === "max") { return index.max[l]; }
      var v = lab(l)[key === "det" ? 2 : 3];
      return v === null || v === undefined ? -Infinity : v;
    }
    function draw() {
      body.textContent = "";
      rows.slice(0, limit).forEach(function (l) {
        var L = lab(l);
        body.appendChild(el("tr", {}, [el("td", {}, [el("a", {href: "latent.html#" + l, text: String(l)})]),
          el("td", {text: L[0]}), el("td", {cls: "num", text: fmt(index.freq[l])}),
          el("td", {cls: "num", text: fmt(index.max[l])}),
          el("td", {cls: "num", text: L[2] === null ? "" : fmt(L[2])}),
          el("td", {cls: "num", text: L[3] === null ? "" : fmt(L[3])})]));
      });
      count.textContent = rows.length + " of " + n + " latents" + (rows.length > limit ? " (first " + limit + " shown)" : "");
      more.hidden = rows.length <= limit;
    }
    function apply() {
      var words = box.value.toLowerCase().split(/\s+/).filter(function (w) { return w.length > 0; });
      rows = [];
      for (var l = 0; l < n; l++) {
        var L = labels[l], text = L ? (l + " " + L[0] + " " + L[1]).toLowerCase() : String(l);
        if (words.every(function (w) { return text.indexOf(w) >= 0; })) { rows.push(l); }
      }
      rows.sort(function (a, b) {
        var va = value(a, sortKey), vb = value(b, sortKey);
        return va < vb ? -sortDir : va > vb ? sortDir : a - b;
      });
      limit = PAGE;
      draw();
    }
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.title = "sort";
      th.addEventListener("click", function () {
        var key = th.getAttribute("data-key");
        sortDir = key === sortKey ? -sortDir : (key === "latent" || key === "label" ? 1 : -1);
        sortKey = key;
        apply();
      });
    });
    more.addEventListener("click", function () { limit += PAGE; draw(); });
    box.addEventListener("input", apply);
    var q = new URLSearchParams(window.location.search).get("q");
    if (q) { box.value = q; }
    apply();
  }

  // ---- latent.html#l: one latent ------------------------------------------------------------------------------
  var SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    return e;
  }
  function histogram(h) {  // h = [hi, first bin, counts...]: bars on a log scale, as charts.bar_chart draws
    var W = 360, H = 150, L = 44, B = 22, T = 8, R = 8, pw = W - L - R, ph = H - T - B, bins = meta.bins;
    var hi = h[0], first = h[1], counts = h.slice(2);
    var vals = counts.map(function (c) { return Math.log10(1 + c); });
    var top = Math.max.apply(null, [0].concat(vals)) || 1, bw = pw / bins;
    var s = svg("svg", {"class": "chart", viewBox: "0 0 " + W + " " + H, width: W, height: H, role: "img",
                        "aria-label": "activation histogram"});
    s.appendChild(svg("rect", {x: L, y: T, width: pw, height: ph, "class": "plot"}));
    counts.forEach(function (c, i) {
      if (!c) { return; }
      var b = svg("rect", {"class": "bar", x: (L + (first + i) * bw).toFixed(2), y: (T + ph * (1 - vals[i] / top)).toFixed(2),
                           width: Math.max(bw - 0.5, 0.5).toFixed(2), height: (ph * vals[i] / top).toFixed(2)});
      var t = svg("title", {});
      t.textContent = fmt(hi * (first + i) / bins) + ": " + fmt(c);
      b.appendChild(t);
      s.appendChild(b);
    });
    [[L - 4, T + 9, "end", fmt(Math.max.apply(null, [0].concat(counts))) + " (log)"], [L - 4, T + ph, "end", "0"],
     [L, H - 6, "start", "0"], [W - R, H - 6, "end", fmt(hi)], [L + pw / 2, H - 6, "middle", "activation"]
    ].forEach(function (a) {
      var t = svg("text", {x: a[0], y: a[1], "class": "ax", "text-anchor": a[2]});
      t.textContent = a[3];
      s.appendChild(t);
    });
    return s;
  }
  function digit(s, i) { return ALPHABET.indexOf(s.charAt(i)); }
  function context(win, score, mx) {  // win = [peak offset, token ids, fired: (offset, permille) 3 digits each]
    var toks = ids(win[1]), act = {}, spans = [], f = win[2];
    for (var i = 0; i < f.length; i += 3) { act[digit(f, i)] = digit(f, i + 1) * 64 + digit(f, i + 2); }
    toks.forEach(function (id, j) {
      var q = act[j] || 0, a = q * mx / 1000;
      var s = el("span", {cls: j === win[0] ? "t pk" : "t", title: fmt(a), "data-act": Number(a.toPrecision(4))});
      if (q > 0) { s.style.background = "rgba(255,120,0," + (q / 1000).toFixed(2) + ")"; }
      s.textContent = piece(id);
      spans.push(s);
    });
    return el("div", {cls: "ctx"}, [el("span", {cls: "score", text: fmt(score)}), el("span", {cls: "toks"}, spans)]);
  }
  function tokens(rec, key, title) {
    var card = el("div", {cls: "card"}, [el("h3", {text: title})]);
    if (!rec[key]) { card.appendChild(el("p", {cls: "muted", text: "no model was given to top_contexts"})); return card; }
    var t = el("table"), logits = rec[key][1];
    ids(rec[key][0]).forEach(function (id, i) {
      t.appendChild(el("tr", {}, [el("td", {cls: "tok", text: piece(id)}), el("td", {cls: "num", text: fmt(logits[i])})]));
    });
    card.appendChild(t);
    return card;
  }
  function latentPage(root) {
    var n = meta.n_latents;
    function show() {
      var l = parseInt(window.location.hash.slice(1), 10);
      if (!(l >= 0 && l < n)) { l = 0; }
      var s = Math.floor(l / meta.shard);
      if (!shards[s]) {
        if (!loading[s]) {
          loading[s] = true;
          var tag = el("script", {src: "data/latents-" + s + ".js"});
          tag.onload = show;
          tag.onerror = function () { root.textContent = "missing data file data/latents-" + s + ".js"; };
          document.body.appendChild(tag);
        }
        return;
      }
      draw(l, shards[s][l - s * meta.shard]);
    }
    function draw(l, rec) {
      var lab = rec.lab || ["", "", null, null];
      document.title = ("Latent " + l + " " + lab[0]).trim();
      var prev = document.getElementById("prev"), next = document.getElementById("next");
      prev.hidden = l === 0;
      prev.href = "#" + (l - 1);
      prev.textContent = "\u2190 " + (l - 1);
      next.hidden = l + 1 >= n;
      next.href = "#" + (l + 1);
      next.textContent = (l + 1) + " \u2192";
      var parts = [el("h1", {text: "Latent " + l + (lab[0] ? ": " + lab[0] : "")})];
      if (rec.lab) {
        parts.push(el("p", {cls: "desc", text: lab[1]}));
        parts.push(el("p", {cls: "muted", text: "confidence " + fmt(lab[2]) + " \u00b7 detection score " +
                                                   (lab[3] === null ? "not scored" : fmt(lab[3]))}));
      }
      parts.push(el("div", {cls: "stats"}, [["firing frequency", rec.f], ["tokens fired", rec.n],
        ["max activation", rec.x], ["mean activation", rec.m]].map(function (p) {
        return el("div", {cls: "stat"}, [el("b", {text: fmt(p[1])}), el("span", {text: p[0]})]);
      })));
      parts.push(el("div", {cls: "row"}, [el("div", {cls: "card"}, [el("h3", {text: "activation histogram (non-zero)"}),
                                                                    histogram(rec.h)])]));
      parts.push(el("div", {cls: "row"}, [tokens(rec, "p", "promoted tokens"), tokens(rec, "s", "suppressed tokens")]));
      Object.keys(meta.aggs).forEach(function (agg) {
        var sec = el("section", {cls: "contexts", id: agg}, [el("h2", {text: "Top contexts by " + meta.aggs[agg]})]);
        var scores = rec.c[agg][0], which = ids(rec.c[agg][1], 2);
        which.forEach(function (w, i) { sec.appendChild(context(rec.w[w], scores[i], rec.x)); });
        if (!which.length) { sec.appendChild(el("p", {cls: "muted", text: "never fired"})); }
        parts.push(sec);
      });
      root.textContent = "";
      parts.forEach(function (p) { root.appendChild(p); });
      window.scrollTo(0, 0);
    }
    window.addEventListener("hashchange", show);
    show();
  }

  document.addEventListener("DOMContentLoaded", function () {
    var table = document.getElementById("latents"), root = document.getElementById("latent");
    if (table && index) { indexPage(table); }
    if (root && meta) { latentPage(root); }
  });
})();
