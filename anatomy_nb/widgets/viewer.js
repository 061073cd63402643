// AuditViewer: linked data / feature maps, ranked signals table, concept drilldown.
// (widgets/common.js is prepended: el, fmt, fmtp, signed, divergingColor, badgeEl, Scatter.)

function render({ model, el: root }) {
  root.classList.add("anb-root", "anb-viewer");
  // typing in our inputs (Enter, digits, arrows) must reach them, not JupyterLab's notebook shortcuts
  root.dataset.lmSuppressShortcuts = "true";
  const height = model.get("height") || 360;

  // --- layout ---------------------------------------------------------------------------------
  const bar = el("div", "anb-bar");
  const scopeEl = el("span", "anb-scope");
  const topicSel = el("select", "anb-topic-select");
  const lassoBtn = el("button", "anb-btn anb-lasso", "lasso");
  const resetBtn = el("button", "anb-btn anb-reset", "all pairs");
  const colorSel = el("select", "anb-color-select");
  for (const [v, t] of [["topic", "colour pairs by topic"], ["effect", "colour pairs by concept effect"]]) {
    const o = el("option", null, t); o.value = v; colorSel.appendChild(o);
  }
  bar.append(el("b", null, "Scope: "), scopeEl, topicSel, lassoBtn, resetBtn, colorSel);
  const maps = el("div", "anb-maps");
  const tableBox = el("div", "anb-table-box");
  const drill = el("div", "anb-drill");
  // what DPO on this data will teach: the report's first section, rendered by Python (ui.summary) and
  // shown in a sandboxed iframe, so its HTML never runs in this page (dataset text in it is escaped too)
  if (model.get("summary")) {
    const box = el("details", "anb-summary-box");
    box.open = true;
    box.appendChild(el("summary", null, "What DPO on this data will teach"));
    const frame = document.createElement("iframe");
    frame.setAttribute("sandbox", "");
    frame.className = "anb-summary-frame";
    frame.srcdoc = model.get("summary");
    box.appendChild(frame);
    root.append(box);
  }
  root.append(bar, maps, el("div", "anb-split"));
  root.lastChild.append(tableBox, drill);

  const dataMap = new Scatter(maps, {
    height, title: `data: pairs by prompt (${(model.get("data_map").method || "").toUpperCase()} of prompt features) — shift-drag to lasso`,
    onHover: (i) => {
      const d = model.get("data_map"), eff = model.get("pair_effect");
      const e = eff.length ? ` · effect ${signed(eff[i], 2)}` : "";
      return `pair ${i} · topic ${d.topic[i]}${e}\n${d.text ? d.text[i] : ""}`;
    },
    onClick: () => {},
    onLasso: (idx) => { model.set("selected_topic", -1); model.set("selected_pairs", idx); model.save_changes(); },
  });
  const featMap = new Scatter(maps, {
    height, title: `features: co-firing (${(model.get("feature_map").method || "").toUpperCase()}), coloured by their concept's effect — click to drill down`,
    onHover: (i) => {
      const f = model.get("feature_map"), c = f.concept[i], row = rowOf(c);
      return `feature ${f.feature[i]} · concept ${c}${row ? ` · ${row.badge} · Δ ${signed(row.mean_diff)}` : ""}\n${row ? row.label : ""}`;
    },
    onClick: (i) => { if (i >= 0) select(model.get("feature_map").concept[i]); },
  });

  function rowOf(c) { return model.get("concepts").find((r) => r.concept === c); }
  function select(c) { model.set("selected_concept", c); model.save_changes(); }

  // --- maps -----------------------------------------------------------------------------------
  const topicColor = (t) => { const tp = model.get("topics").find((x) => x.topic === t); return tp ? tp.color : "#adb5bd"; };
  function drawData() {
    const d = model.get("data_map"), eff = model.get("pair_effect");
    let colors;
    if (colorSel.value === "effect" && eff.length) {
      const m = Math.max(1e-9, ...eff.map(Math.abs));
      colors = eff.map((v) => divergingColor(v, m));
    } else colors = d.topic.map(topicColor);
    dataMap.setData(d.x, d.y, colors);
    const sel = model.get("selected_pairs");
    dataMap.setHighlight(sel.length ? new Set(sel) : null);
  }
  function drawFeatures() {
    const f = model.get("feature_map"), rows = model.get("concepts");
    const byC = new Map(rows.map((r) => [r.concept, r]));
    const m = Math.max(1e-9, ...rows.map((r) => Math.abs(r.cohens_d || 0)));
    const colors = f.concept.map((c) => divergingColor(byC.has(c) ? byC.get(c).cohens_d : null, m));
    featMap.setData(f.x, f.y, colors);
    const c = model.get("selected_concept");
    featMap.setHighlight(c >= 0 ? new Set(f.concept.map((x, i) => (x === c ? i : -1)).filter((i) => i >= 0)) : null);
    reportTimes();
  }
  function reportTimes() {
    model.set("render_ms", { data_points: dataMap.x.length, data_ms: dataMap.lastDrawMs, feature_points: featMap.x.length, feature_ms: featMap.lastDrawMs });
    model.save_changes();
  }

  // --- topics and scope ------------------------------------------------------------------------
  function drawTopics() {
    topicSel.replaceChildren();
    const all = el("option", null, "all topics"); all.value = "-1"; topicSel.appendChild(all);
    for (const t of model.get("topics")) {
      const o = el("option", null, `topic ${t.topic} (${t.n_pairs}): ${t.label}`); o.value = String(t.topic); topicSel.appendChild(o);
    }
    topicSel.value = String(model.get("selected_topic"));
  }
  topicSel.addEventListener("change", () => { model.set("selected_topic", Number(topicSel.value)); model.save_changes(); });
  lassoBtn.addEventListener("click", () => { dataMap.lassoMode = !dataMap.lassoMode; lassoBtn.classList.toggle("anb-on", dataMap.lassoMode); });
  resetBtn.addEventListener("click", () => { model.set("selected_topic", -1); model.set("selected_pairs", []); model.save_changes(); });
  colorSel.addEventListener("change", drawData);

  // --- ranked signals table (overall re-scored on the scope; topic × concept, opening, ending as ranked by stage 2)
  let sortKey = null, sortDir = -1, tableView = "overall";
  const split = (r) => `${r.split_mark} ${fmt(r.split_half, 2)}`;
  const ci = (r) => r.ci_low === null || r.ci_low === undefined ? signed(r.mean_diff) : `${signed(r.mean_diff)} [${fmt(r.ci_low)}, ${fmt(r.ci_high)}]`;
  const columnsFor = {
    overall: [
      ["rank", "#", (r) => r.rank],
      ["concept", "concept", (r) => r.concept],
      ["badge", "fires on", (r) => r.badge],
      ["mean_diff", "Δ (95 % CI)", ci],
      ["z", "z", (r) => fmt(r.z, 1)],
      ["cohens_d", "d", (r) => fmt(r.cohens_d, 2)],
      ["p", "p", (r) => fmtp(r.p)],
      ["split_half", "split-half", split],
      ["n_features", "features", (r) => r.n_features],
      ["label", "label", (r) => r.label],
    ],
    other: [
      ["rank", "#", (r) => r.rank],
      ["where", "where", (r) => r.where],
      ["concept", "concept", (r) => r.concept],
      ["mean_diff", "Δ", ci],
      ["z", "z", (r) => fmt(r.z, 1)],
      ["q", "q", (r) => fmtp(r.q)],
      ["split_half", "split-half", split],
      ["label", "label", (r) => r.label],
    ],
  };
  const viewSel = el("select", "anb-view-select");
  for (const [v, t] of [["overall", "whole response (re-scored on the scope)"], ["topic", "topic × concept"], ["opening", "opening tokens"], ["ending", "ending tokens"]]) {
    const o = el("option", null, t); o.value = v; viewSel.appendChild(o);
  }
  viewSel.addEventListener("change", () => { tableView = viewSel.value; sortKey = null; drawTable(); });
  function drawTable() {
    const columns = columnsFor[tableView === "overall" ? "overall" : "other"];
    let rows = (tableView === "overall" ? model.get("concepts") : (model.get("view_rows")[tableView] || [])).slice();
    if (sortKey) rows.sort((a, b) => { const x = a[sortKey], y = b[sortKey]; return (x > y ? 1 : x < y ? -1 : 0) * sortDir; });
    const t = el("table", `anb-table anb-signals anb-view-${tableView}`);
    const head = el("tr");
    for (const [k, name] of columns) {
      const th = el("th", sortKey === k ? "anb-sorted" : null, name + (sortKey === k ? (sortDir > 0 ? " ▲" : " ▼") : ""));
      th.dataset.key = k;
      th.addEventListener("click", () => { sortDir = sortKey === k ? -sortDir : -1; sortKey = k; drawTable(); });
      head.appendChild(th);
    }
    t.appendChild(el("thead")).appendChild(head);
    const body = el("tbody");
    const sel = model.get("selected_concept");
    for (const r of rows) {
      const tr = el("tr", r.concept === sel ? "anb-selected" : null);
      tr.dataset.concept = String(r.concept);
      for (const [k, , f] of columns) {
        const td = el("td", `anb-col-${k}`);
        if (k === "badge") td.appendChild(badgeEl(r.badge)); else td.textContent = String(f(r));
        if (k === "split_half") td.title = "sign agreement over random half/half splits of the prompts (✓ ≥ 0.9)";
        tr.appendChild(td);
      }
      tr.addEventListener("click", () => {
        if (tableView === "topic" && r.topic >= 0) { model.set("selected_topic", r.topic); model.save_changes(); }
        select(r.concept);
      });
      body.appendChild(tr);
    }
    t.appendChild(body);
    const caption = tableView === "overall"
      ? `Ranked signals — ${model.get("scope")} (click a row to drill down; click a header to sort)`
      : `Ranked signals — ${viewSel.selectedOptions[0].textContent}, as stage 2 ranked them on all pairs (click a row to drill down${tableView === "topic" ? " inside its topic" : ""})`;
    tableBox.replaceChildren(el("div", "anb-caption", caption), viewSel, t);
  }

  // --- drilldown -------------------------------------------------------------------------------------
  function histogram(h) {
    const c = document.createElement("canvas"), w = 260, hh = 90, dpr = window.devicePixelRatio || 1;
    c.width = w * dpr; c.height = hh * dpr; c.style.width = `${w}px`; c.style.height = `${hh}px`; c.className = "anb-hist";
    const ctx = c.getContext("2d"); ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const n = h.chosen.length, m = Math.max(1, ...h.chosen, ...h.rejected), bw = (w - 10) / n;
    [["chosen", "rgba(25,113,194,0.6)"], ["rejected", "rgba(201,42,42,0.5)"]].forEach(([side, col]) => {
      ctx.fillStyle = col;
      h[side].forEach((v, i) => { const bh = (v / m) * (hh - 16); ctx.fillRect(5 + i * bw, hh - 12 - bh, bw - 1, bh); });
    });
    ctx.fillStyle = "#495057"; ctx.font = "10px sans-serif";
    ctx.fillText("0", 2, hh - 1); ctx.fillText("1", w - 8, hh - 1); ctx.fillText("concept activity per response", 60, hh - 1);
    return c;
  }
  function kv(parent, k, v) { const p = el("div", "anb-kv"); p.append(el("span", "anb-k", k), el("span", "anb-v", v)); parent.appendChild(p); }

  function drawDrill() {
    const d = model.get("drilldown");
    drill.replaceChildren();
    if (!d || d.concept === undefined) { drill.appendChild(el("div", "anb-empty", "Select a concept (table row or feature point) to see its drilldown.")); return; }
    const h = el("h4", "anb-drill-title");
    h.append(el("span", null, `concept ${d.concept} `), badgeEl(d.overall.badge));
    drill.appendChild(h);
    drill.appendChild(el("div", "anb-drill-label", d.label));
    const stats = el("div", "anb-stats");
    const o = d.overall;
    kv(stats, "Δ chosen − rejected", `${signed(o.mean_diff)} [95 % ${fmt(o.ci_low)}, ${fmt(o.ci_high)}]`);
    kv(stats, "Cohen's d · p · q", `${fmt(o.cohens_d, 2)} · ${fmtp(o.p)} · ${fmtp(o.q)}`);
    kv(stats, "fires on chosen / rejected", `${fmt(o.chosen_rate * 100, 1)} % / ${fmt(o.rejected_rate * 100, 1)} %`);
    kv(stats, "predicted under DPO", `${o.predicted_direction} (${signed(o.predicted_change)})`);
    kv(stats, "split-half sign agreement", fmt(d.split_half, 2));
    kv(stats, "at equal length", `d ${fmt(d.length_control.cohens_d, 2)}, p ${fmtp(d.length_control.p)} — ${d.length_control.survives ? "survives" : "does not survive"}`);
    if (d.selection) kv(stats, `in ${model.get("scope")}`, `${signed(d.selection.mean_diff)} [${fmt(d.selection.ci_low)}, ${fmt(d.selection.ci_high)}] · ${d.selection.badge}`);
    kv(stats, "promoted tokens", d.promoted_tokens || "–");
    kv(stats, "peak tokens", d.peak_tokens || "–");
    kv(stats, "text statistics", d.text_stats || "–");
    kv(stats, "features", `${d.n_features}: ${d.features.slice(0, 20).join(", ")}${d.features.length > 20 ? " …" : ""}`);
    drill.appendChild(stats);
    const hb = el("div", "anb-hist-box");
    hb.append(el("div", "anb-caption", "activity: chosen (blue) vs rejected (red)"), histogram(d.histogram));
    drill.appendChild(hb);
    drill.appendChild(el("div", "anb-caption", "top-activating contexts (peak token outlined; every token shaded by the feature's activation on it)"));
    const ctxs = el("div", "anb-contexts");
    for (const c of d.contexts) {
      const line = el("div", "anb-context");
      line.appendChild(el("span", "anb-ctx-meta", `f${c.feature} · pair ${c.pair} · ${c.side} · ${fmt(c.value, 2)}  `));
      const acts = c.activations || [];
      c.tokens.forEach((t, i) => {
        const span = el("span", i === c.peak ? "anb-tok anb-peak" : "anb-tok", t);
        const a = acts[i];
        if (i !== c.peak && a && c.value) { span.style.background = `rgba(255, 200, 0, ${Math.min(1, a / c.value).toFixed(2)})`; span.classList.add("anb-active"); }
        if (a !== null && a !== undefined) span.title = `activation ${fmt(a, 2)}`;
        line.appendChild(span);
      });
      ctxs.appendChild(line);
    }
    drill.appendChild(ctxs);
    if (d.examples.length) {
      drill.appendChild(el("div", "anb-caption", "example pairs where the concept separates the sides"));
      for (const e of d.examples) {
        const ex = el("div", "anb-example");
        ex.appendChild(el("div", "anb-prompt", `pair ${e.id}: ${e.prompt}`));
        const sides = el("div", "anb-sides");
        for (const side of ["chosen", "rejected"]) {
          const act = e[`${side}_activity`];
          const s = el("div", `anb-side anb-${side}${act > 0 ? " anb-active" : ""}`);
          s.appendChild(el("div", "anb-side-head", `${side} · concept activity ${fmt(act, 2)}`));
          s.appendChild(el("div", "anb-side-text", e[side]));
          sides.appendChild(s);
        }
        ex.appendChild(sides);
        drill.appendChild(ex);
      }
    }
    if (d.topics.length) {
      drill.appendChild(el("div", "anb-caption", "inside each topic (Δ inside − outside)"));
      const t = el("table", "anb-table");
      for (const r of d.topics) {
        const tr = el("tr", r.significant ? "anb-sig" : null);
        tr.append(el("td", null, `topic ${r.topic}`), el("td", null, signed(r.mean_diff)), el("td", null, `q ${fmtp(r.q)}`), el("td", null, r.label));
        t.appendChild(tr);
      }
      drill.appendChild(t);
    }
  }

  function scope() { scopeEl.textContent = model.get("scope"); }

  model.on("change:concepts", () => { drawTable(); drawFeatures(); });
  model.on("change:selected_concept", () => { drawTable(); drawFeatures(); });
  model.on("change:drilldown", drawDrill);
  model.on("change:pair_effect", () => { if (model.get("pair_effect").length && colorSel.value === "topic") colorSel.value = "effect"; drawData(); });
  model.on("change:selected_pairs", drawData);
  model.on("change:selected_topic", () => { topicSel.value = String(model.get("selected_topic")); });
  model.on("change:scope", () => { scope(); drawTable(); });
  model.on("change:topics", drawTopics);

  drawTopics(); scope(); drawTable(); drawDrill();
  // the canvases need the layout's width: draw once attached
  requestAnimationFrame(() => { drawData(); drawFeatures(); });
  const ro = new ResizeObserver(() => { dataMap.draw(); featMap.draw(); });
  ro.observe(maps);
  return () => ro.disconnect();
}

export default { render };
