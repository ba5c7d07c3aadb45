// attnpipe report: the interactive head view (in the manner of bertviz's head view).
// Pick a document, a layer and a head; point at a token on the left to see what it attends to
// (lines and shading on the right), or at a token on the right to see what attends to it.
// A click keeps the selection until the next click. Data: the JSON in #hv-data. Encoder-decoder
// pair runs add a choice of attention (encoder self, decoder self, decoder cross): the left column
// holds the site's query tokens, the right its key tokens (cross: target left, source right).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("hv-data").textContent);
  const docSel = document.getElementById("hv-doc");
  const siteSel = document.getElementById("hv-site");
  const siteLabel = document.getElementById("hv-site-label");
  const layerSel = document.getElementById("hv-layer");
  const headSel = document.getElementById("hv-head");
  const svg = document.getElementById("hv-svg");
  const info = document.getElementById("hv-info");
  const source = document.getElementById("hv-source");
  const NS = "http://www.w3.org/2000/svg";
  const ROW = 20, LEFT_X = 150, RIGHT_X = 450, TOP = 24;
  let locked = null;   // {side: "q" | "k", pos} while a click holds the selection
  let view = null;     // the selected view: {q: [], k: [], w: [], source}
  let qTokens = [], kTokens = [];  // the tokens drawn on the left (queries) and right (keys)

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value; o.textContent = text; select.appendChild(o);
  }
  function headName(h) { return h === "-1" ? "mean of heads" : h === "rollout" ? "rollout" : "head " + h; }
  const SITE_NAMES = {"encoder-self": "encoder self", "decoder-self": "decoder self", "decoder-cross": "decoder cross"};
  // The tokens on each side of a site: [query tokens, key tokens].
  function sideTokens(doc, site) {
    const target = doc.target_tokens || [];
    if (site === "decoder-self") return [target, target];
    if (site === "decoder-cross") return [target, doc.tokens];
    return [doc.tokens, doc.tokens];
  }

  function fillDocs() {
    data.docs.forEach((d, i) => option(docSel, i, d.doc_id + (d.window_index ? " (window " + d.window_index + ")" : "")));
  }
  function fillLayersHeads() {
    const doc = data.docs[docSel.value];
    const layer = layerSel.value, head = headSel.value, site = siteSel.value;
    layerSel.innerHTML = ""; headSel.innerHTML = ""; siteSel.innerHTML = "";
    const sites = doc.sites || [""];
    sites.forEach(s => option(siteSel, s, SITE_NAMES[s] || s));
    if (sites.includes(site)) siteSel.value = site;
    siteLabel.style.display = sites.length > 1 ? "" : "none";
    doc.layers.forEach(l => option(layerSel, l, "layer " + l));
    doc.heads.forEach(h => option(headSel, h, headName(h)));
    if (doc.layers.map(String).includes(layer)) layerSel.value = layer;
    else layerSel.value = String(doc.layers[doc.layers.length - 1]);
    if (doc.heads.includes(head)) headSel.value = head;
  }

  function el(name, attrs, text) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function draw() {
    const doc = data.docs[docSel.value];
    view = doc.views[siteSel.value + "|" + layerSel.value + "|" + headSel.value] ||
      {q: [], k: [], w: [], source: "nothing stored for this layer and head"};
    [qTokens, kTokens] = sideTokens(doc, siteSel.value);
    locked = null;
    source.textContent = "source: " + view.source;
    const n = Math.max(qTokens.length, kTokens.length);
    svg.innerHTML = "";
    svg.setAttribute("height", TOP + n * ROW + 10);
    svg.setAttribute("width", RIGHT_X + 170);
    svg.appendChild(el("text", {x: LEFT_X, y: 12, "text-anchor": "end", "font-size": 11, fill: "#777"}, "attending (query)"));
    svg.appendChild(el("text", {x: RIGHT_X, y: 12, "font-size": 11, fill: "#777"}, "attended (key)"));
    const y = i => TOP + i * ROW + ROW / 2;
    for (let i = 0; i < kTokens.length; i++) {
      svg.appendChild(el("rect", {class: "heat", "data-pos": i, x: RIGHT_X - 4, y: y(i) - ROW / 2 + 1,
                                 width: 160, height: ROW - 2, opacity: 0}));
    }
    const lines = el("g", {id: "hv-lines"});
    svg.appendChild(lines);
    view.q.forEach((q, e) => {
      lines.appendChild(el("line", {x1: LEFT_X + 6, y1: y(q), x2: RIGHT_X - 6, y2: y(view.k[e]),
                                   "stroke-width": 2, opacity: 0.5 * view.w[e], "data-q": q, "data-k": view.k[e]}));
    });
    const nodes = qTokens.map((t, i) => [el("text", {class: "tok q", "data-pos": i, x: LEFT_X, y: y(i) + 4,
                                                      "text-anchor": "end"}, t), "q", i])
      .concat(kTokens.map((t, i) => [el("text", {class: "tok k", "data-pos": i, x: RIGHT_X, y: y(i) + 4}, t), "k", i]));
    nodes.forEach(([node, side, i]) => {
      node.addEventListener("mouseenter", () => { if (!locked) select(side, i); });
      node.addEventListener("mouseleave", () => { if (!locked) select(null); });
      node.addEventListener("click", () => {
        if (locked && locked.side === side && locked.pos === i) { locked = null; select(null); }
        else { locked = {side: side, pos: i}; select(side, i); }
      });
      svg.appendChild(node);
    });
    select(null);
  }

  // Highlight one token's edges (side "q": what it attends to; "k": what attends to it).
  function select(side, pos) {
    svg.querySelectorAll("text.tok").forEach(t => t.classList.remove("active"));
    svg.querySelectorAll("rect.heat").forEach(r => r.setAttribute("opacity", 0));
    const lines = svg.querySelectorAll("#hv-lines line");
    if (side === null) {
      lines.forEach((l, e) => l.setAttribute("opacity", 0.5 * view.w[e]));
      info.textContent = "Point at a token (click to keep it) to see where its attention goes.";
      return;
    }
    const other = side === "q" ? "k" : "q";
    const picked = [];
    let top = 0;
    lines.forEach((l, e) => {
      if (Number(l.getAttribute("data-" + side)) === pos) top = Math.max(top, view.w[e]);
    });
    // Opacity relative to the strongest edge of this token, so a spread-out head still shows.
    lines.forEach((l, e) => {
      const hit = Number(l.getAttribute("data-" + side)) === pos;
      l.setAttribute("opacity", hit ? 0.1 + 0.9 * view.w[e] / (top || 1) : 0);
      if (hit) picked.push([Number(l.getAttribute("data-" + other)), view.w[e]]);
    });
    svg.querySelector("text.tok." + side + "[data-pos='" + pos + "']").classList.add("active");
    if (side === "q") {
      picked.forEach(([k, w]) => svg.querySelector("rect.heat[data-pos='" + k + "']").setAttribute("opacity", 0.8 * w / (top || 1)));
    }
    picked.sort((a, b) => b[1] - a[1]);
    const [mine, theirs] = side === "q" ? [qTokens, kTokens] : [kTokens, qTokens];
    const strongest = picked.slice(0, 6).map(([p, w]) => theirs[p] + " " + w.toFixed(3)).join(", ");
    const verb = side === "q" ? " attends to: " : " is attended by: ";
    info.textContent = "'" + mine[pos] + "' (position " + pos + ")" + verb + (strongest || "nothing stored");
  }

  fillDocs();
  fillLayersHeads();
  docSel.addEventListener("change", () => { fillLayersHeads(); draw(); });
  siteSel.addEventListener("change", draw);
  layerSel.addEventListener("change", draw);
  headSel.addEventListener("change", draw);
  draw();
})();
