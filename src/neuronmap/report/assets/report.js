// neuronmap report: draws the embedded Vega-Lite figures and the neuron atlas.
// Everything comes from the JSON block #neuronmap-data; nothing is fetched. Data is put into the
// page with textContent only, so a token or prompt can never be read as markup.
"use strict";

const DATA = JSON.parse(document.getElementById("neuronmap-data").textContent);
const EMBED_OPTIONS = {renderer: "svg", actions: {export: true, source: false, compiled: false, editor: false}};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child != null) node.append(child);
  return node;
}

// JSON does not keep 1.0 apart from 1: each column says how its numbers read.
function fmt(value, digits = 3) {
  if (value == null) return "–";
  if (Number.isInteger(value)) return String(value);
  return Math.abs(value) >= 1000 ? value.toFixed(0) : value.toPrecision(digits);
}
const fixed = (value) => (value == null ? "–" : value.toFixed(3));
// Tokens that are, or contain, whitespace a reader could not see.
const visible = (token) => (token.trim() === "" ? "␣".repeat(token.length) :
  token.replace(/\n/g, "⏎").replace(/\t/g, "⇥"));
const breakable = (name) => name.replaceAll("_", "_\u200b");

function renderFigures() {
  return Promise.all(DATA.figures.map((figure) =>
    vegaEmbed(`#figure-${figure.name}`, figure.spec, EMBED_OPTIONS)));
}

// ---------------------------------------------------------------- the atlas
function buildAtlas(atlas) {
  const root = document.getElementById("atlas-app");
  if (!atlas || !root) return;
  const n = atlas.site.length;
  const relations = atlas.relations;
  const limit = atlas.units_per_relation;
  const label = (i) => `${atlas.site[i]} L${atlas.layer[i]} #${atlas.unit[i]}`;
  const rankOf = (r, i) => atlas.expertise.rank[r][i];
  const decodedFirst = (i) => atlas.decoded ? (atlas.decoded.tokens[atlas.decoded.variants[0]][i] || []) : [];
  const tops = (i) => (atlas.top ? atlas.top[i] : []);
  const promptText = (entry) => atlas.prompts.text[entry[0]];

  // What the search box looks through: the unit's name, its decoded tokens and its peak tokens.
  const haystack = Array.from({length: n}, (_, i) => {
    const words = [label(i), `${atlas.site[i]} ${atlas.layer[i]} ${atlas.unit[i]}`];
    if (atlas.decoded) for (const v of atlas.decoded.variants) words.push(...(atlas.decoded.tokens[v][i] || []));
    for (const entry of tops(i)) words.push(entry[2]);
    return words.join("\n").toLowerCase();
  });

  const columns = [
    {title: "site", sort: (i) => atlas.site[i], cell: (i) => el("td", {text: atlas.site[i]})},
    {title: "layer", sort: (i) => atlas.layer[i], cell: (i) => el("td", {class: "num", text: atlas.layer[i]})},
    {title: "unit", sort: (i) => atlas.unit[i], cell: (i) => el("td", {class: "num", text: atlas.unit[i]})},
    {title: "best relation (rank)", sort: (i) => atlas.best_rank[i],
     cell: (i) => el("td", {text: `${atlas.best_relation[i]} (${atlas.best_rank[i]})`})},
    ...relations.map((r) => ({
      title: `AP ${breakable(r)}`, descending: true, relation: r,
      sort: (i) => atlas.expertise.ap[r][i],
      cell: (i) => el("td", {class: "num" + (rankOf(r, i) <= limit ? " selected-for" : ""),
                              title: `rank ${rankOf(r, i)} for ${r}`, text: fixed(atlas.expertise.ap[r][i])}),
    })),
    {title: "firing rate", descending: true, sort: (i) => (atlas.stats ? atlas.stats.frac_positive[i] : null),
     cell: (i) => el("td", {class: "num", text: atlas.stats ? fixed(atlas.stats.frac_positive[i]) : "–"})},
    {title: "mean", descending: true, sort: (i) => (atlas.stats ? atlas.stats.mean[i] : null),
     cell: (i) => el("td", {class: "num", text: atlas.stats ? fmt(atlas.stats.mean[i]) : "–"})},
    {title: "decoded top tokens", sort: (i) => decodedFirst(i).join(" "),
     cell: (i) => el("td", {class: "tokens", title: decodedFirst(i).join(" | ")},
                     ...decodedFirst(i).slice(0, 5).map((t) => el("span", {class: "chip", text: visible(t)})))},
    {title: "top-activating prompt", descending: true, sort: (i) => (tops(i).length ? tops(i)[0][3] : null),
     cell: (i) => {
       const td = el("td", {class: "snippet"});
       if (tops(i).length) td.append(...highlighted(promptText(tops(i)[0]), tops(i)[0], 48));
       return td;
     }},
  ];

  const state = {query: "", relation: "", layer: "", site: "", sortColumn: 3, descending: false, shown: 200};
  const search = root.querySelector("#atlas-search");
  const relationSelect = root.querySelector("#atlas-relation");
  const layerSelect = root.querySelector("#atlas-layer");
  const siteSelect = root.querySelector("#atlas-site");
  const count = root.querySelector("#atlas-count");
  const table = root.querySelector("table.atlas");
  const more = root.querySelector("button.more");

  for (const r of relations) relationSelect.append(el("option", {value: r, text: `${r} (top ${limit})`}));
  for (const layer of [...new Set(atlas.layer)].sort((a, b) => a - b))
    layerSelect.append(el("option", {value: String(layer), text: `layer ${layer}`}));
  for (const site of [...new Set(atlas.site)]) siteSelect.append(el("option", {value: site, text: site}));

  const headRow = el("tr");
  columns.forEach((column, c) => {
    const th = el("th", {text: column.title, scope: "col", tabindex: "0"});
    const activate = () => {
      state.descending = state.sortColumn === c ? !state.descending : Boolean(column.descending);
      state.sortColumn = c;
      update();
    };
    th.addEventListener("click", activate);
    th.addEventListener("keydown", (event) => { if (event.key === "Enter") activate(); });
    headRow.append(th);
  });
  table.append(el("thead", {}, headRow));
  const body = el("tbody");
  table.append(body);

  function matches(i, words) {
    if (state.relation && !(rankOf(state.relation, i) <= limit)) return false;
    if (state.layer !== "" && String(atlas.layer[i]) !== state.layer) return false;
    if (state.site && atlas.site[i] !== state.site) return false;
    return words.every((w) => haystack[i].includes(w));
  }

  function update() {
    const words = state.query.toLowerCase().split(/\s+/).filter(Boolean);
    const rows = [];
    for (let i = 0; i < n; i++) if (matches(i, words)) rows.push(i);
    const key = columns[state.sortColumn].sort;
    const sign = state.descending ? -1 : 1;
    rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x == null && y == null) return a - b;
      if (x == null) return 1;
      if (y == null) return -1;
      return (x < y ? -1 : x > y ? 1 : 0) * sign || a - b;
    });
    headRow.querySelectorAll("th").forEach((th, c) => {
      if (c === state.sortColumn) th.setAttribute("aria-sort", state.descending ? "descending" : "ascending");
      else th.removeAttribute("aria-sort");
    });
    body.replaceChildren(...rows.slice(0, state.shown).map((i) => {
      const tr = el("tr", {"data-index": String(i), tabindex: "0"}, ...columns.map((column) => column.cell(i)));
      tr.addEventListener("click", () => openCard(i));
      tr.addEventListener("keydown", (event) => { if (event.key === "Enter") openCard(i); });
      return tr;
    }));
    count.textContent = `${rows.length} of ${n} units` +
      (rows.length > state.shown ? ` (first ${state.shown} shown)` : "");
    count.dataset.count = String(rows.length);
    more.hidden = rows.length <= state.shown;
  }

  search.addEventListener("input", () => { state.query = search.value; state.shown = 200; update(); });
  relationSelect.addEventListener("change", () => {
    state.relation = relationSelect.value;
    if (state.relation) {  // a relation's units read best in its own order
      state.sortColumn = columns.findIndex((column) => column.relation === state.relation);
      state.descending = true;
    }
    update();
  });
  layerSelect.addEventListener("change", () => { state.layer = layerSelect.value; update(); });
  siteSelect.addEventListener("change", () => { state.site = siteSelect.value; update(); });
  more.addEventListener("click", () => { state.shown += 500; update(); });

  // ------------------------------------------------------------ the card of one unit
  const card = document.getElementById("atlas-card");

  function openCard(i) {
    body.querySelectorAll("tr.active").forEach((tr) => tr.classList.remove("active"));
    const row = body.querySelector(`tr[data-index="${i}"]`);
    if (row) row.classList.add("active");
    history.replaceState(null, "", `#unit=${atlas.site[i]}-${atlas.layer[i]}-${atlas.unit[i]}`);
    card.replaceChildren(...cardContent(i));
    card.hidden = false;
    card.dataset.unit = label(i);
  }

  function cardContent(i) {
    const parts = [el("h3", {text: label(i)}),
      el("div", {class: "note", text: `best: ${atlas.best_relation[i]}, rank ${atlas.best_rank[i]}`})];
    const expertise = el("table", {class: "data"},
      el("thead", {}, el("tr", {}, ...["relation", "rank", "AP", "p50 on", "p90 on", "mean off"]
        .map((t) => el("th", {text: t})))));
    const order = [...relations].sort((a, b) => rankOf(a, i) - rankOf(b, i));
    const tbody = el("tbody");
    for (const r of order) {
      const e = atlas.expertise;
      tbody.append(el("tr", {}, el("td", {text: breakable(r)}), el("td", {text: fmt(e.rank[r][i])}),
        el("td", {text: fixed(e.ap[r][i])}), el("td", {text: fmt(e.on_p50[r][i])}),
        el("td", {text: fmt(e.on_p90[r][i])}), el("td", {text: fmt(e.off_mean[r][i])})));
    }
    expertise.append(tbody);
    parts.push(el("h4", {text: "Expertise per relation"}), expertise);

    parts.push(el("h4", {text: "Activation statistics (every token)"}));
    if (atlas.stats) {
      const s = atlas.stats;
      parts.push(el("dl", {class: "facts"},
        ...[["firing rate (> 0)", s.frac_positive[i]],
            ...(s.frac_active ? [["active (|value| > threshold)", s.frac_active[i]]] : []),
            ["mean", s.mean[i]], ["sd", s.sd[i]], ["min", s.min[i]], ["max", s.max[i]], ["tokens", s.count[i]]]
          .flatMap(([name, value]) => [el("dt", {text: name}), el("dd", {text: fmt(value)})])));
    } else parts.push(el("p", {class: "empty", text: "not recorded"}));

    parts.push(el("h4", {text: "Decoded through the LM head"}));
    if (atlas.decoded) {
      for (const v of atlas.decoded.variants) {
        const tokens = atlas.decoded.tokens[v][i] || [];
        parts.push(el("div", {}, v ? el("div", {class: "note", text: v}) : null,
          ...tokens.map((t) => el("span", {class: "chip", text: visible(t)}))));
      }
    } else parts.push(el("p", {class: "empty", text: "not recorded"}));

    parts.push(el("h4", {text: "Top-activating prompts (peak token marked)"}));
    if (atlas.top) {
      const list = el("ol");
      for (const entry of tops(i)) {
        const [promptIndex, position, token, value, start] = entry;
        const pre = el("pre", {}, ...highlighted(atlas.prompts.text[promptIndex], entry, null));
        list.append(el("li", {}, el("div", {class: "note",
          text: `${fmt(value)} at token ${position} ${JSON.stringify(token)} · ${atlas.prompts.id[promptIndex]}` +
                (start < 0 ? " (token not located in the text)" : "")}), pre));
      }
      parts.push(tops(i).length ? list : el("p", {class: "empty", text: "none recorded"}));
    } else parts.push(el("p", {class: "empty", text: "not recorded"}));
    return parts;
  }

  update();
  const wanted = /^#unit=([a-z]+)-(\d+)-(\d+)$/.exec(location.hash);
  if (wanted) {
    for (let i = 0; i < n; i++) {
      if (atlas.site[i] === wanted[1] && String(atlas.layer[i]) === wanted[2] && String(atlas.unit[i]) === wanted[3]) {
        openCard(i);
        break;
      }
    }
  }
}

// The prompt as text nodes with the peak token in <mark>; `context` trims it around the peak.
function highlighted(text, entry, context) {
  let [, , , , start, end] = entry;
  if (start < 0) return [document.createTextNode(context ? text.slice(-context) : text)];
  let from = 0, to = text.length;
  if (context) {
    from = Math.max(0, start - context);
    to = Math.min(text.length, end + context / 2);
  }
  const prefix = (from > 0 ? "…" : "") + text.slice(from, start);
  return [document.createTextNode(prefix), el("mark", {text: text.slice(start, end)}),
          document.createTextNode(text.slice(end, to) + (to < text.length ? "…" : ""))];
}

Promise.all([renderFigures(), Promise.resolve().then(() => buildAtlas(DATA.atlas))])
  .then(() => { document.body.dataset.rendered = "true"; })
  .catch((error) => { document.body.dataset.rendered = "error"; console.error(error); });
