// ConceptToggles: allow / suppress / amplify, method and strength per concept; the predicted
// change and spill-over next to each; Python validates and writes run_dir/plan/plan.json on each change.
// (widgets/common.js is prepended.)

function render({ model, el: root }) {
  root.classList.add("anb-root", "anb-toggles");
  // typing in our inputs (Enter, digits, arrows) must reach them, not JupyterLab's notebook shortcuts
  root.dataset.lmSuppressShortcuts = "true";
  const status = el("div", "anb-status");
  const error = el("div", "anb-error");
  const filter = el("input", "anb-filter");
  filter.type = "search"; filter.placeholder = "filter concepts by label or id";
  const onlyChanged = el("label", "anb-only");
  const onlyBox = el("input"); onlyBox.type = "checkbox";
  onlyChanged.append(onlyBox, document.createTextNode(" changed only"));
  const tableBox = el("div", "anb-table-box");
  const spillBox = el("div", "anb-spill");
  const bar = el("div", "anb-bar");
  bar.append(filter, onlyChanged);
  root.append(bar, status, error, tableBox, spillBox);

  function update(concept, patch) {
    const choices = { ...model.get("choices") };
    const cur = { ...(choices[concept] || { action: "allow", method: "", strength: 1 }) };
    if (patch.method !== undefined && patch.method !== cur.method && patch.strength === undefined) {
      patch.strength = model.get("default_strength")[patch.method] ?? 1;
    }
    if (patch.action && patch.action !== "allow" && !cur.method && !patch.method) {
      patch.method = "reward_shaping";
      patch.strength = model.get("default_strength").reward_shaping;
    }
    choices[concept] = { ...cur, ...patch };
    model.set("choices", choices);
    model.set("selected_concept", Number(concept.split(":")[1]));
    model.save_changes();
  }

  function drawTable() {
    const rows = model.get("rows"), choices = model.get("choices");
    const prev = new Map(model.get("preview").map((p) => [p.concept, p]));
    const q = filter.value.trim().toLowerCase(), sel = model.get("selected_concept");
    const t = el("table", "anb-table anb-toggle-table");
    const head = el("tr");
    for (const h of ["concept", "fires on", "Δ now", "action", "method", "strength", "predicted Δ", "own", "spill-over", "basis", "label"]) head.appendChild(el("th", null, h));
    t.appendChild(el("thead")).appendChild(head);
    const body = el("tbody");
    for (const r of rows) {
      const ch = choices[r.concept] || { action: "allow", method: "", strength: 1 };
      if (onlyBox.checked && ch.action === "allow") continue;
      if (q && !(`${r.concept} ${r.label}`.toLowerCase().includes(q))) continue;
      const tr = el("tr", `anb-action-${ch.action}${r.id === sel ? " anb-selected" : ""}`);
      tr.dataset.concept = r.concept;
      tr.append(el("td", "anb-col-concept", r.concept));
      const b = el("td"); b.appendChild(badgeEl(r.badge)); tr.appendChild(b);
      tr.appendChild(el("td", null, `${signed(r.mean_diff)} [${fmt(r.ci_low)}, ${fmt(r.ci_high)}]`));
      // action: three radio-like buttons
      const act = el("td", "anb-actions");
      for (const a of model.get("actions")) {
        const btn = el("button", `anb-btn anb-act anb-act-${a}${ch.action === a ? " anb-on" : ""}`, a);
        btn.dataset.action = a;
        btn.addEventListener("click", () => update(r.concept, { action: a }));
        act.appendChild(btn);
      }
      tr.appendChild(act);
      const mtd = el("td");
      const ms = el("select", "anb-method");
      ms.disabled = ch.action === "allow";
      const none = el("option", null, "—"); none.value = ""; ms.appendChild(none);
      for (const m of model.get("methods")) { const o = el("option", null, m.replace("_", " ")); o.value = m; ms.appendChild(o); }
      ms.value = ch.method || "";
      ms.addEventListener("change", () => update(r.concept, { method: ms.value }));
      mtd.appendChild(ms);
      if (ch.method === "inoculate" && ch.action !== "allow") {
        const ins = el("input", "anb-instruction"); ins.type = "text"; ins.value = ch.instruction || "";
        ins.title = "training-only instruction added to the prompts";
        ins.addEventListener("change", () => update(r.concept, { instruction: ins.value }));
        mtd.appendChild(ins);
      }
      if (ch.method === "filter" && ch.action !== "allow") {
        const fm = el("select", "anb-filter-mode");
        for (const v of ["drop", "flip"]) { const o = el("option", null, v); o.value = v; fm.appendChild(o); }
        fm.value = ch.filter_mode || "drop";
        fm.addEventListener("change", () => update(r.concept, { filter_mode: fm.value }));
        mtd.appendChild(fm);
      }
      tr.appendChild(mtd);
      const st = el("td");
      const inp = el("input", "anb-strength"); inp.type = "number"; inp.step = "0.1"; inp.min = "0";
      inp.value = String(ch.strength ?? 1); inp.disabled = ch.action === "allow";
      // commit on change and on Enter: inside JupyterLab the field can be refocused after typing,
      // and then Enter alone fires no change event
      let sent = inp.value;
      const commit = () => { if (inp.value !== sent) { sent = inp.value; update(r.concept, { strength: Number(inp.value) }); } };
      inp.addEventListener("change", commit);
      inp.addEventListener("keydown", (e) => { if (e.key === "Enter") commit(); });
      st.appendChild(inp); tr.appendChild(st);
      const p = prev.get(r.concept) || {};
      tr.append(el("td", "anb-after", signed(p.after)), el("td", null, signed(p.direct)), el("td", null, signed(p.spillover)), el("td", "anb-basis", p.basis || ""), el("td", "anb-col-label", r.label));
      tr.addEventListener("click", (ev) => { if (ev.target === tr || ev.target.tagName === "TD") { model.set("selected_concept", r.id); model.save_changes(); } });
      body.appendChild(tr);
    }
    t.appendChild(body);
    tableBox.replaceChildren(t);
  }

  function drawSpill() {
    const edges = model.get("spill");
    spillBox.replaceChildren();
    if (!edges.length) { spillBox.appendChild(el("div", "anb-caption", "No concept is targeted: no spill-over predicted.")); return; }
    spillBox.appendChild(el("div", "anb-caption", "Predicted spill-over onto correlated concepts (strongest first)"));
    const t = el("table", "anb-table");
    const head = el("tr");
    for (const h of ["targeted", "moves", "correlation", "shift", "label"]) head.appendChild(el("th", null, h));
    t.appendChild(head);
    for (const e of edges) {
      const tr = el("tr");
      tr.append(el("td", null, e.source), el("td", null, e.target), el("td", null, fmt(e.correlation, 2)), el("td", null, signed(e.shift)), el("td", "anb-col-label", e.target_label));
      t.appendChild(tr);
    }
    spillBox.appendChild(t);
  }

  function drawStatus() {
    status.textContent = `${model.get("status")} → ${model.get("plan_path")}`;
    error.textContent = model.get("error");
    error.style.display = model.get("error") ? "block" : "none";
  }

  filter.addEventListener("input", drawTable);
  onlyBox.addEventListener("change", drawTable);
  model.on("change:choices", drawTable);
  model.on("change:preview", drawTable);
  model.on("change:rows", drawTable);
  model.on("change:selected_concept", drawTable);
  model.on("change:spill", drawSpill);
  model.on("change:status", drawStatus);
  model.on("change:error", drawStatus);
  drawStatus(); drawTable(); drawSpill();
}

export default { render };
