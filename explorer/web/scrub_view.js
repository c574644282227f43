// The instant step view (explorer/web/scrub_view.py): every step's frames, influencer tiles, captions, note
// and plot marker arrive once per Generate (props.value, a JSON string); moving the step slider switches
// steps here, in the browser, with no server round trip. The tiles are made once per top-k and then only
// their src, caption and highlight change, so the DOM does not grow while scrubbing.
const root = element.querySelector('.dax-scrub');
const grids = {
  positive: root.querySelector('#positive .dax-grid'),
  negative: root.querySelector('#negative .dax-grid'),
};
const frames = [root.querySelector('img.dax-xt'), root.querySelector('img.dax-x0')];
const note = root.querySelector('.dax-note');
const view = { data: null, token: null, step: -1, selected: null, gd: null, t: null, markerPending: false };

function lineParts() {
  const line = document.querySelector('#step-line .dax-line');
  return line ? [line, line.querySelector('.dax-line-text'), line.querySelector('a.dax-link')] : [null];
}

function setText(node, text) {  // reuse the text node: no new node per step
  if (node.firstChild && node.firstChild.nodeType === Node.TEXT_NODE && !node.firstChild.nextSibling) {
    node.firstChild.nodeValue = text;
  } else {
    node.textContent = text;
  }
}

function makeTiles(grid, count, sign) {
  while (grid.children.length < count) {
    const tile = document.createElement('button');
    tile.type = 'button';
    tile.className = 'thumbnail-item dax-tile';
    const img = document.createElement('img');
    img.alt = '';
    img.draggable = false;
    const caption = document.createElement('span');
    caption.className = 'caption-label';
    tile.append(img, caption);
    tile.addEventListener('click', () => select(sign, Array.prototype.indexOf.call(grid.children, tile)));
    grid.appendChild(tile);
  }
  while (grid.children.length > count) grid.lastChild.remove();
}

function fill(grid, list) {
  const thumbs = view.data.thumbs;
  for (let i = 0; i < list.length; i++) {
    const row = list[i][0], caption = list[i][1], tile = grid.children[i];
    const img = tile.firstChild, label = tile.lastChild, src = thumbs[row];
    if (img.getAttribute('src') !== src) img.setAttribute('src', src);
    if (label.textContent !== caption) setText(label, caption);
    tile.title = caption;
    tile.dataset.row = row;
    tile.classList.toggle('selected', row === view.selected);
  }
}

function marker() {
  const gd = document.querySelector('#likelihood .js-plotly-plot');
  if (!gd || !window.Plotly || !gd.layout || view.t === null) return;
  if (gd !== view.gd) {  // a new plot (Generate, the completions): keep the marker where the slider is
    view.gd = gd;
    gd.on && gd.on('plotly_afterplot', () => requestAnimationFrame(marker));
  }
  const shapes = gd.layout.shapes || [];
  if (shapes.length && shapes[0].x0 !== view.t) {
    window.Plotly.relayout(gd, { 'shapes[0].x0': view.t, 'shapes[0].x1': view.t });
  }
}

function show(step, force) {
  const data = view.data;
  if (!data) return;
  step = Math.max(0, Math.min(data.last, Math.round(Number(step))));
  if (Number.isNaN(step) || (step === view.step && !force)) return;
  view.step = step;
  const current = data.steps[step];
  frames[0].setAttribute('src', data.frames[step][0]);
  frames[1].setAttribute('src', data.frames[step][1]);
  for (const sign of ['positive', 'negative']) {
    makeTiles(grids[sign], current[sign].length, sign);
    fill(grids[sign], current[sign]);
  }
  setText(note, current.note);
  const [line, text, link] = lineParts();
  if (line) {
    setText(text, current.line);
    link.setAttribute('href', current.link);
    line.hidden = false;
  }
  root.dataset.step = step;
  view.t = current.t;
  if (!view.markerPending) {  // after this frame is painted: the tiles first, the plot's marker next
    view.markerPending = true;
    requestAnimationFrame(() => setTimeout(() => { view.markerPending = false; marker(); }, 0));
  }
}

function select(sign, rank) {
  const list = view.data.steps[view.step][sign];
  view.selected = list[rank][0];
  for (const s of ['positive', 'negative']) fill(grids[s], view.data.steps[view.step][s]);
  trigger('select', { index: rank, value: sign });
}

function load() {
  if (!props.value) return;
  const data = JSON.parse(props.value);
  const fresh = data.token !== view.token;
  view.data = data;
  view.token = data.token;
  root.classList.remove('dax-empty');
  if (fresh) {
    view.selected = data.selected;
    show(data.step, true);
  } else {
    show(view.step, true);  // the same generation, new notes (the completions arrived): stay on this step
  }
}

// the step slider: its range input moves the view at once (one listener per page, calling the view that
// loaded last); programmatic moves come through window.daxScrub.show from ui.py's js-only change event
window.daxScrub = { show: (step) => show(step), step: () => view.step };
if (!window.daxScrubListening) {
  window.daxScrubListening = true;
  document.addEventListener('input', (event) => {
    const target = event.target;
    if (target && target.matches && target.matches('#step-slider input[type=range]')) {
      window.daxScrub.show(target.value);
    }
  }, true);
}
watch('value', load);
load();
