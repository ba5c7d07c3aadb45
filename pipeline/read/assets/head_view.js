// attnpipe report: the interactive head view (in the manner of bertviz's head view).
// Pick a document, a layer and a head; point at a token on the left to see what it attends to
// (lines and shading on the right), or at a token on the right to see what attends to it.
// A click keeps the selection until the next click. Data: the JSON in #hv-data.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("hv-data").textContent);
  const docSel = document.getElementById("hv-doc");
  const layerSel = document.getElementById("hv-layer");
  const headSel = document.getElementById("hv-head");
  const svg = document.getElementById("hv-svg");
  const info = document.getElementById("hv-info");
  const source = document.getElementById("hv-source");
  const NS = "http://www.w3.org/2000/svg";
  const ROW = 20, LEFT_X = 150, RIGHT_X = 450, TOP = 24;
  let locked = null;   // {side: "q" | "k", pos} while a click holds the selection
  let view = null;     // the selected view: {q: [], k: [], w: [], source}

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = value; o.textContent = text; select.appendChild(o);
  }
  function headName(h) { return h === "-1" ? "mean of heads" : h === "rollout" ? "rollout" : "head " + h; }

  function fillDocs() {
    data.docs.forEach((d, i) => option(docSel, i, d.doc_id + (d.window_index ? " (window " + d.window_index + ")" : "")));
  }
  function fillLayersHeads() {
    const doc = data.docs[docSel.value];
    const layer = layerSel.value, head = headSel.value;
    layerSel.innerHTML = ""; headSel.innerHTML = "";
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
    view = doc.views[layerSel.value + "|" + headSel.value] || {q: [], k: [], w: [], source: "nothing stored for this layer and head"};
    locked = null;
    source.textContent = "source: " + view.source;
    const n = doc.tokens.length;
    svg.innerHTML = "";
    svg.setAttribute("height", TOP + n * ROW + 10);
    svg.setAttribute("width", RIGHT_X + 170);
    svg.appendChild(el("text", {x: LEFT_X, y: 12, "text-anchor": "end", "font-size": 11, fill: "#777"}, "attending (query)"));
    svg.appendChild(el("text", {x: RIGHT_X, y: 12, "font-size": 11, fill: "#777"}, "attended (key)"));
    const y = i => TOP + i * ROW + ROW / 2;
    for (let i = 0; i < n; i++) {
      svg.appendChild(el("rect", {class: "heat", "data-pos": i, x: RIGHT_X - 4, y: y(i) - ROW / 2 + 1,
                                 width: 160, height: ROW - 2, opacity: 0}));
    }
    const lines = el("g", {id: "hv-lines"});
    svg.appendChild(lines);
    view.q.forEach((q, e) => {
      lines.appendChild(el("line", {x1: LEFT_X + 6, y1: y(q), x2: RIGHT_X - 6, y2: y(view.k[e]),
                                   "stroke-width": 2, opacity: 0.5 * view.w[e], "data-q": q, "data-k": view.k[e]}));
    });
    doc.tokens.forEach((t, i) => {
      const left = el("text", {class: "tok q", "data-pos": i, x: LEFT_X, y: y(i) + 4, "text-anchor": "end"}, t);
      const right = el("text", {class: "tok k", "data-pos": i, x: RIGHT_X, y: y(i) + 4}, t);
      for (const [node, side] of [[left, "q"], [right, "k"]]) {
        node.addEventListener("mouseenter", () => { if (!locked) select(side, i); });
        node.addEventListener("mouseleave", () => { if (!locked) select(null); });
        node.addEventListener("click", () => {
          if (locked && locked.side === side && locked.pos === i) { locked = null; select(null); }
          else { locked = {side: side, pos: i}; select(side, i); }
        });
        svg.appendChild(node);
      }
    });
    select(null);
  }

  // Highlight one token's edges (side "q": what it attends to; "k": what attends to it).
  function select(side, pos) {
    const doc = data.docs[docSel.value];
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
    const strongest = picked.slice(0, 6).map(([p, w]) => doc.tokens[p] + " " + w.toFixed(3)).join(", ");
    const verb = side === "q" ? " attends to: " : " is attended by: ";
    info.textContent = "'" + doc.tokens[pos] + "' (position " + pos + ")" + verb + (strongest || "nothing stored");
  }

  fillDocs();
  fillLayersHeads();
  docSel.addEventListener("change", () => { fillLayersHeads(); draw(); });
  layerSel.addEventListener("change", draw);
  headSel.addEventListener("change", draw);
  draw();
})();
