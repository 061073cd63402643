// anatomy_nb widgets: shared helpers, prepended by anatomy_nb/viewer.py to each widget module.
// Dataset text is untrusted: it only ever enters the page through textContent (see el()), never
// innerHTML, and no element gets an href, src or event attribute built from data.

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return Number(v).toFixed(digits);
}

function fmtp(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return v < 1e-3 ? Number(v).toExponential(1) : Number(v).toPrecision(2);
}

function signed(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  return (v >= 0 ? "+" : "") + Number(v).toFixed(digits);
}

// diverging colour for an effect in [-m, m]: rejected (red) ← grey → chosen (blue)
function divergingColor(v, m) {
  if (v === null || v === undefined || Number.isNaN(v) || !m) return "rgb(173,181,189)";
  const t = Math.max(-1, Math.min(1, v / m));
  const grey = [206, 212, 218], blue = [25, 113, 194], red = [201, 42, 42];
  const end = t >= 0 ? blue : red, a = Math.abs(t);
  const c = grey.map((g, i) => Math.round(g + (end[i] - g) * a));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

function badgeEl(badge) {
  return el("span", `anb-badge anb-badge-${["chosen", "rejected", "both", "neither"].includes(badge) ? badge : "neither"}`, badge);
}

// A canvas scatter plot that stays responsive with ~50k points: one fillRect per point, points
// batched by colour, a uniform grid for hover/click hit tests, lasso by shift-drag (or the lasso
// mode), point-in-polygon over all points on release.
class Scatter {
  constructor(parent, { height = 320, onHover, onClick, onLasso, title = "" } = {}) {
    this.root = el("div", "anb-scatter");
    if (title) this.root.appendChild(el("div", "anb-scatter-title", title));
    this.canvas = document.createElement("canvas");
    this.canvas.className = "anb-canvas";
    this.overlay = document.createElement("canvas");
    this.overlay.className = "anb-canvas anb-overlay";
    this.tip = el("div", "anb-tip");
    this.tip.style.display = "none";
    const wrap = el("div", "anb-canvas-wrap");
    wrap.style.height = `${height}px`;
    wrap.append(this.canvas, this.overlay, this.tip);
    this.root.appendChild(wrap);
    parent.appendChild(this.root);
    this.wrap = wrap;
    this.height = height;
    this.onHover = onHover; this.onClick = onClick; this.onLasso = onLasso;
    this.x = []; this.y = []; this.colors = []; this.highlight = null; this.lastDrawMs = 0;
    this.lassoMode = false;
    this._bind();
  }

  setData(x, y, colors, labels) {
    this.x = x; this.y = y; this.colors = colors; this.labels = labels || null;
    this._index = null;
    this.draw();
  }

  setColors(colors) { this.colors = colors; this.draw(); }
  setHighlight(set) { this.highlight = set && set.size ? set : null; this.draw(); }

  _size() {
    const w = Math.max(50, this.wrap.clientWidth || 400), h = this.height;
    const dpr = window.devicePixelRatio || 1;
    for (const c of [this.canvas, this.overlay]) {
      if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
        c.width = Math.round(w * dpr); c.height = Math.round(h * dpr);
        c.style.width = `${w}px`; c.style.height = `${h}px`;
      }
    }
    return { w, h, dpr };
  }

  _px(i) { const m = 8; return [m + this.x[i] * (this._w - 2 * m), m + (1 - this.y[i]) * (this._h - 2 * m)]; }

  draw() {
    const t0 = performance.now();
    const { w, h, dpr } = this._size();
    this._w = w; this._h = h;
    const ctx = this.canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const n = this.x.length, r = n > 20000 ? 1.5 : n > 2000 ? 2.5 : 4;
    const byColor = new Map();
    for (let i = 0; i < n; i++) {
      const c = this.colors[i] || "#868e96";
      let list = byColor.get(c);
      if (!list) { list = []; byColor.set(c, list); }
      list.push(i);
    }
    ctx.globalAlpha = this.highlight ? 0.25 : 0.85;
    for (const [c, list] of byColor) {
      ctx.fillStyle = c;
      for (const i of list) { const [px, py] = this._px(i); ctx.fillRect(px - r, py - r, 2 * r, 2 * r); }
    }
    if (this.highlight) {
      ctx.globalAlpha = 1;
      ctx.strokeStyle = "#212529";
      for (const i of this.highlight) {
        if (i >= n) continue;
        const [px, py] = this._px(i);
        ctx.fillStyle = this.colors[i] || "#868e96";
        ctx.fillRect(px - r - 1, py - r - 1, 2 * r + 2, 2 * r + 2);
        ctx.strokeRect(px - r - 1, py - r - 1, 2 * r + 2, 2 * r + 2);
      }
    }
    ctx.globalAlpha = 1;
    this.lastDrawMs = performance.now() - t0;
    this.root.dataset.points = String(n);
    this.root.dataset.drawMs = this.lastDrawMs.toFixed(1);
    return this.lastDrawMs;
  }

  _buildIndex() {
    const cell = 12, cols = Math.ceil(this._w / cell) + 1, grid = new Map();
    for (let i = 0; i < this.x.length; i++) {
      const [px, py] = this._px(i);
      const k = Math.floor(px / cell) + cols * Math.floor(py / cell);
      let list = grid.get(k);
      if (!list) { list = []; grid.set(k, list); }
      list.push(i);
    }
    this._index = { cell, cols, grid, w: this._w };
  }

  nearest(mx, my, radius = 8) {
    if (!this._index || this._index.w !== this._w) this._buildIndex();
    const { cell, cols, grid } = this._index;
    const cx = Math.floor(mx / cell), cy = Math.floor(my / cell);
    let best = -1, bd = radius * radius;
    for (let dx = -1; dx <= 1; dx++) for (let dy = -1; dy <= 1; dy++) {
      const list = grid.get(cx + dx + cols * (cy + dy));
      if (!list) continue;
      for (const i of list) {
        const [px, py] = this._px(i), d = (px - mx) ** 2 + (py - my) ** 2;
        if (d < bd) { bd = d; best = i; }
      }
    }
    return best;
  }

  lassoSelect(poly) {
    const out = [];
    for (let i = 0; i < this.x.length; i++) {
      const [px, py] = this._px(i);
      let inside = false;
      for (let a = 0, b = poly.length - 1; a < poly.length; b = a++) {
        const [xa, ya] = poly[a], [xb, yb] = poly[b];
        if ((ya > py) !== (yb > py) && px < ((xb - xa) * (py - ya)) / (yb - ya) + xa) inside = !inside;
      }
      if (inside) out.push(i);
    }
    return out;
  }

  _bind() {
    const pos = (ev) => { const b = this.overlay.getBoundingClientRect(); return [ev.clientX - b.left, ev.clientY - b.top]; };
    let poly = null;
    const octx = () => { const c = this.overlay.getContext("2d"); const dpr = window.devicePixelRatio || 1; c.setTransform(dpr, 0, 0, dpr, 0, 0); return c; };
    this.overlay.addEventListener("mousedown", (ev) => {
      if (ev.shiftKey || this.lassoMode) { poly = [pos(ev)]; ev.preventDefault(); }
    });
    this.overlay.addEventListener("mousemove", (ev) => {
      const [mx, my] = pos(ev);
      if (poly) {
        poly.push([mx, my]);
        const c = octx(); c.clearRect(0, 0, this._w, this._h);
        c.strokeStyle = "#343a40"; c.setLineDash([4, 3]); c.beginPath();
        poly.forEach(([x, y], k) => (k ? c.lineTo(x, y) : c.moveTo(x, y)));
        c.stroke();
        return;
      }
      const i = this.nearest(mx, my);
      if (i >= 0 && this.onHover) {
        this.tip.textContent = this.onHover(i);
        this.tip.style.display = "block";
        this.tip.style.left = `${Math.min(mx + 12, this._w - 220)}px`;
        this.tip.style.top = `${my + 12}px`;
      } else this.tip.style.display = "none";
    });
    this.overlay.addEventListener("mouseleave", () => { this.tip.style.display = "none"; });
    this.overlay.addEventListener("mouseup", (ev) => {
      if (poly) {
        const p = poly; poly = null;
        octx().clearRect(0, 0, this._w, this._h);
        if (p.length > 2 && this.onLasso) this.onLasso(this.lassoSelect(p));
        return;
      }
      const [mx, my] = pos(ev), i = this.nearest(mx, my);
      if (this.onClick) this.onClick(i);
    });
  }
}
