// SegGen's synthetic-data browser (common/report/browse.py writes data/; this page reads it from disk).
// Every data file is a script calling SEGGEN.put(name, value): browsers block fetch() on file://.
// The view lives in the URL: #sort=-miou&class=wall&source=ADE_train_00000001&rule=classes&page=2&size=48
// (sort: a figure, "-" first = descending; rule: MaskSyn's rejected masks, "all" or one rule).
"use strict";

const SEGGEN = (() => {
  const got = {}, waiting = {};
  let meta = null;

  function put(name, value) {
    got[name] = value;
    (waiting[name] || []).forEach(([resolve]) => resolve(value));
    delete waiting[name];
  }

  function load(name) {
    if (name in got) return Promise.resolve(got[name]);
    return new Promise((resolve, reject) => {
      if (!waiting[name]) {
        waiting[name] = [];
        const s = document.createElement("script");
        s.src = "data/" + name + ".js";
        s.onerror = () => { (waiting[name] || []).forEach(([, rej]) => rej(new Error("missing data/" + name + ".js"))); delete waiting[name]; };
        document.head.appendChild(s);
      }
      waiting[name].push([resolve, reject]);
    });
  }

  // ------------------------------------------------------------ the view in the URL
  function state() {
    const p = new URLSearchParams(location.hash.slice(1));
    const page = Math.max(1, parseInt(p.get("page") || "1", 10) || 1);
    const size = Math.max(1, Math.min(500, parseInt(p.get("size") || String(meta.page), 10) || meta.page));
    return {sort: p.get("sort") || "order", cls: p.get("class") || "", source: p.get("source") || "",
            rule: p.get("rule") || "", page, size};
  }

  function go(changes) {
    const p = new URLSearchParams(location.hash.slice(1));
    for (const [k, v] of Object.entries(changes)) { if (v === "" || v === null) p.delete(k); else p.set(k, v); }
    if (!("page" in changes)) p.delete("page");
    location.hash = p.toString();
  }

  // ------------------------------------------------------------ positions of a page
  const bits = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const has = (bitmap, pos) => (bitmap[pos >> 3] >> (pos & 7)) & 1;

  async function orderChunk(coll, k, j) {  // positions of order chunk j of figure k (k 0: manifest order)
    const c = meta.chunk, n = meta.collections[coll].count;
    if (k === 0) { const out = []; for (let p = j * c; p < Math.min(n, (j + 1) * c); p++) out.push(p); return out; }
    return load(`${coll}/o${k}-${j}`);
  }

  async function membersAt(coll, k, filter, indices) {  // positions of ascending member indices
    const c = meta.chunk, out = [];
    if (!filter) {
      for (const i of indices) out.push((await orderChunk(coll, k, Math.floor(i / c)))[i % c]);
      return out;
    }
    const [counts, bitmap] = await Promise.all([load(`${coll}/n${k}-${filter.file}`), load(`${coll}/b${filter.file}`).then(bits)]);
    const kept = {};
    for (const i of indices) {
      let lo = 0, hi = counts.cum.length - 2;  // the order chunk j with cum[j] <= i < cum[j + 1]
      while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (counts.cum[mid] <= i) lo = mid; else hi = mid - 1; }
      if (!kept[lo]) kept[lo] = (await orderChunk(coll, k, lo)).filter((p) => has(bitmap, p));
      out.push(kept[lo][i - counts.cum[lo]]);
    }
    return out;
  }

  async function record(coll, pos) {
    const c = meta.record_chunk;
    const rec = (await load(`${coll}/r${Math.floor(pos / c)}`))[pos % c];
    return Object.assign({pos}, rec);
  }

  function figure(rec, name) {
    if (name === "order") return rec.pos;
    const v = rec.q ? rec.q[name] : undefined;
    return typeof v === "number" ? v : null;
  }

  async function sourcePositions(coll, source) {
    const firsts = meta.collections[coll].sources;
    let j = -1;
    for (let b = 0; b < firsts.length; b++) if (firsts[b] <= source) j = b;  // buckets are sorted by source id
    if (j < 0) return [];
    return (await load(`${coll}/g${j}`))[source] || [];
  }

  async function pageOf(st) {
    const coll = st.rule ? "x" : "s", info = meta.collections[coll];
    const desc = st.sort.startsWith("-"), name = desc ? st.sort.slice(1) : st.sort;
    const k = info.keys.findIndex((x) => x.name === name);
    if (k < 0) throw new Error(`no figure "${name}" to sort by (known: ${info.keys.map((x) => x.name).join(", ")})`);
    let filterName = null;
    if (coll === "s" && st.cls) {
      const value = Object.keys(meta.classes).find((v) => meta.classes[v].name === st.cls || v === st.cls);
      if (value === undefined) throw new Error(`no class "${st.cls}"`);
      filterName = "c" + value;
    } else if (coll === "x" && st.rule !== "all") filterName = "r" + st.rule;
    const filter = filterName ? info.filters[filterName] : null;
    const empty = filterName && !filter;  // a class no sample has, a rule no mask broke
    const start = (st.page - 1) * st.size;
    if (st.source) {  // a few samples: read them all, filter and sort here
      let recs = await Promise.all((await sourcePositions(coll, st.source)).map((p) => record(coll, p)));
      if (filterName) recs = recs.filter((r) => coll === "s" ? r.cls.includes(Number(filterName.slice(1))) : r.rule === st.rule);
      const some = recs.filter((r) => figure(r, name) !== null), none = recs.filter((r) => figure(r, name) === null);
      some.sort((a, b) => (figure(a, name) - figure(b, name)) * (desc ? -1 : 1) || a.pos - b.pos);
      recs = some.concat(none);
      return {coll, total: recs.length, recs: recs.slice(start, start + st.size)};
    }
    const total = empty ? 0 : filter ? filter.count : info.count;
    const valid = empty ? 0 : filter ? (await load(`${coll}/n${k}-${filter.file}`)).valid : info.keys[k].valid;
    const indices = [];
    for (let i = start; i < Math.min(total, start + st.size); i++) indices.push(desc && i < valid ? valid - 1 - i : i);
    const positions = await membersAt(coll, k, filter, indices);
    return {coll, total, recs: await Promise.all(positions.map((p) => record(coll, p)))};
  }

  // ------------------------------------------------------------ drawing
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, v);
    for (const c of children) if (c !== null && c !== undefined) e.append(c);
    return e;
  }
  const url = (prefix, rel) => prefix + rel.split("/").map(encodeURIComponent).join("/");
  const fmt = (v) => typeof v !== "number" ? "–" : Number.isInteger(v) ? String(v) : v.toPrecision(4);
  const pic = (src, label, cls) => el("figure", {class: cls}, el("img", {src, alt: label, loading: "lazy"}), el("figcaption", {}, label));

  function facts(rows) {
    const dl = el("dl", {class: "facts"});
    for (const [k, v] of rows) if (v !== null && v !== undefined && v !== "") dl.append(el("dt", {}, k), el("dd", {}, v));
    return dl;
  }

  function figures(q) {
    const t = el("table", {class: "figs"}), names = Object.keys(q || {}).sort();
    if (!names.length) return null;
    t.append(el("tr", {}, ...names.map((n) => el("th", {}, n))));
    t.append(el("tr", {}, ...names.map((n) => el("td", {"data-fig": n}, fmt(q[n])))));
    return t;
  }

  function sourceLink(src) {
    const a = el("a", {class: "src"}, src);
    a.onclick = () => go({source: src});
    return a;
  }

  function sampleCard(r) {
    const folder = meta.folders[r.f], pics = el("div", {class: "pics"});
    if (r.real && meta.real) pics.append(pic(url(meta.real, r.real), "real " + r.src, "real"));
    const image = url(folder.path, r.img), cmap = r.cm ? url(folder.path, r.cm) : null;
    pics.append(pic(image, "image", "image"));
    if (cmap) {
      pics.append(pic(cmap, "colour map", "colormap"));
      pics.append(el("figure", {class: "overlay"}, el("img", {src: image, alt: "", loading: "lazy"}),
                     el("img", {class: "over", src: cmap, alt: "", loading: "lazy"}), el("figcaption", {}, "label overlay")));
    }
    const legend = el("ul", {class: "legend"}, ...r.cls.map((v) => {
      const c = meta.classes[v] || {name: String(v), color: "#888"};
      return el("li", {"data-class": c.name}, el("span", {class: "sw", style: "background:" + c.color}), c.name);
    }));
    let perClass = null;
    if (r.pc) {
      const t = el("table", {class: "figs"}, el("tr", {}, el("th", {}, "class"), el("th", {}, "loss"), el("th", {}, "pixels"), el("th", {}, "IoU")));
      for (const [tid, loss, pixels, iou] of r.pc) {  // quality.py's classes are train ids
        const c = meta.classes[meta.train_values[tid]];
        const name = c ? c.name : "train id " + tid;
        t.append(el("tr", {}, el("td", {}, name), el("td", {}, fmt(loss)), el("td", {}, fmt(pixels)), el("td", {}, fmt(iou))));
      }
      perClass = el("details", {}, el("summary", {}, "per-class quality"), t);
    }
    return el("article", {class: "card", "data-id": r.id, "data-pos": String(r.pos)}, pics, legend,
              r.cap ? el("p", {class: "cap"}, r.cap) : null,
              facts([["id", r.id], ["folder", folder.name], ["method", r.m], ["source", sourceLink(r.src)], ["k", r.k], ["seed", r.seed]]),
              figures(r.q), perClass);
  }

  function rejectedCard(r) {
    const folder = meta.folders[r.f];
    const pics = el("div", {class: "pics"}, r.cm ? pic(url(folder.path, r.cm), "rejected colour map", "colormap")
                                                : el("div", {class: "nopic"}, "no picture kept"));
    return el("article", {class: "card rejected", "data-id": r.id, "data-pos": String(r.pos), "data-rule": r.rule}, pics,
              el("p", {}, el("span", {class: "rule"}, r.rule), ": " + r.why),
              facts([["id", r.id], ["folder", folder.name], ["source", sourceLink(r.src)], ["k", r.k], ["seed", r.seed]]), figures(r.q));
  }

  // ------------------------------------------------------------ controls
  function options(select, items, value) {
    select.replaceChildren(...items.map(([v, label]) => el("option", {value: v}, label)));
    select.value = value;
  }

  function controls(st, total) {
    const coll = st.rule ? "x" : "s", info = meta.collections[coll], x = meta.collections.x;
    options(document.getElementById("view"), [["", `samples (${meta.collections.s.count})`], ["all", `rejected masks (${x.count})`],
      ...Object.keys(x.filters).sort().map((f) => [f.slice(1), `rejected: ${f.slice(1)} (${x.filters[f].count})`])], st.rule);
    options(document.getElementById("sort"), info.keys.flatMap((k) => k.name === "order"
      ? [["order", "manifest order"], ["-order", "manifest order, reversed"]]
      : [[k.name, `${k.name} ↑`], ["-" + k.name, `${k.name} ↓`]]), st.sort);
    const classes = Object.keys(meta.collections.s.filters).filter((f) => f[0] === "c").map((f) => f.slice(1))
      .map((v) => [meta.classes[v] ? meta.classes[v].name : v, meta.collections.s.filters["c" + v].count])
      .sort((a, b) => a[0].localeCompare(b[0]));
    options(document.getElementById("class"), [["", "all classes"], ...classes.map(([n, c]) => [n, `${n} (${c})`])], st.cls);
    document.getElementById("class").disabled = coll === "x";
    document.getElementById("source").value = st.source;
    document.getElementById("page").value = st.page;
    document.getElementById("pages").textContent = Math.max(1, Math.ceil(total / st.size));
    document.getElementById("count").textContent = `${total} ${coll === "x" ? "rejected masks" : "samples"}`;
    document.getElementById("count").dataset.count = total;
  }

  function wire() {
    const on = (id, ev, f) => document.getElementById(id).addEventListener(ev, f);
    on("view", "change", (e) => go({rule: e.target.value, sort: ""}));
    on("sort", "change", (e) => go({sort: e.target.value}));
    on("class", "change", (e) => go({class: e.target.value}));
    on("source", "change", (e) => go({source: e.target.value.trim()}));
    on("page", "change", (e) => go({page: e.target.value}));
    on("prev", "click", () => go({page: Math.max(1, state().page - 1)}));
    on("next", "click", () => go({page: state().page + 1}));
  }

  async function render() {
    document.body.dataset.state = "loading";
    const message = document.getElementById("message");
    message.textContent = "";
    try {
      const st = state(), t0 = performance.now();
      const {coll, total, recs} = await pageOf(st);
      controls(st, total);
      document.getElementById("grid").replaceChildren(...recs.map(coll === "x" ? rejectedCard : sampleCard));
      if (!meta.real && coll === "s") message.textContent = "real images: none (browse.py was given no --data-root holding the source dataset)";
      document.body.dataset.ms = String(Math.round(performance.now() - t0));
      document.body.dataset.state = "ready";
    } catch (e) {
      message.textContent = String(e.message || e);
      document.getElementById("grid").replaceChildren();
      document.body.dataset.state = "error";
    }
  }

  async function start() {
    try { meta = await load("meta"); } catch (e) {
      document.getElementById("message").textContent = "data/meta.js is missing: rebuild the site with browse.py";
      document.body.dataset.state = "error";
      return;
    }
    wire();
    window.addEventListener("hashchange", render);
    render();
  }

  return {put, load, start};
})();
