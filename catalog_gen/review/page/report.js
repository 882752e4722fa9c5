// Filters, sort and the full-image view. The review script (catalog_gen.review) adds decisions and keys.
(function () {
  'use strict';
  const $ = (s, r) => (r || document).querySelector(s);
  const $$ = (s, r) => Array.from((r || document).querySelectorAll(s));
  const box = $('#cards');
  const cards = $$('.card', box);
  const f = {cls: $('#f-class'), inst: $('#f-instance'), gate: $('#f-gate'), status: $('#f-status'),
             review: $('#f-review'), sort: $('#f-sort'), search: $('#f-search')};

  function candidateShown(c, v) {
    const gates = c.dataset.gates ? c.dataset.gates.split(',') : [];
    if (v.gate === 'none' && gates.length) return false;
    if (v.gate === 'error') return false;
    if (v.gate && v.gate !== 'none' && !gates.includes(v.gate)) return false;
    if (v.status === 'passed' && c.dataset.passed !== '1') return false;
    if (v.status === 'kept' && c.dataset.kept !== '1') return false;
    if (v.status === 'failed' && c.dataset.passed === '1') return false;
    if (v.review && (c.dataset.review || 'undecided') !== v.review) return false;
    return true;
  }

  function applyFilters() {
    const v = {cls: f.cls.value, inst: f.inst.value, gate: f.gate.value, status: f.status.value,
               review: f.review.value, search: f.search.value.trim().toLowerCase()};
    const perCandidate = v.gate || v.status || v.review;
    let shownCards = 0, shownCands = 0, allCands = 0;
    for (const card of cards) {
      let show = (!v.cls || card.dataset.class === v.cls) && (!v.inst || card.dataset.instance === v.inst) &&
                 (!v.search || card.dataset.search.includes(v.search));
      let visible = 0;
      for (const c of $$('.cand', card)) {
        allCands += 1;
        c.hidden = !(show && candidateShown(c, v));
        if (!c.hidden) visible += 1;
      }
      if (show && perCandidate) show = visible > 0 || (v.gate === 'error' && card.dataset.error === '1');
      card.hidden = !show;
      if (show) { shownCards += 1; shownCands += visible; }
    }
    $('#shown').textContent = `showing ${shownCands} of ${allCands} candidates in ${shownCards} SKUs`;
  }

  function sortValue(c, key) {
    const v = parseFloat(c.dataset[key]);
    return Number.isFinite(v) ? v : null;
  }

  function applySort() {
    const [key, way] = f.sort.value.split(':');
    const sign = way === 'desc' ? -1 : 1;
    const byValue = (a, b) => {
      const x = sortValue(a, key), y = sortValue(b, key);
      if (x === null || y === null) return (x === null) - (y === null);
      return sign * (x - y) || (+a.dataset.candidate - +b.dataset.candidate);
    };
    for (const card of cards) {
      const list = $('.cands', card);
      const cands = $$('.cand', list);
      const byNumber = (a, b) => +a.dataset.candidate - +b.dataset.candidate;
      cands.sort(key === 'sheet' || key === 'sku' ? byNumber : byValue);
      cands.forEach(c => list.appendChild(c));
    }
    const ordered = cards.slice();
    if (key === 'sheet') {
      ordered.sort((a, b) => +a.dataset.order - +b.dataset.order);
    } else if (key === 'sku') {
      ordered.sort((a, b) => a.dataset.sku.localeCompare(b.dataset.sku, undefined, {numeric: true})
                             || (+a.dataset.order - +b.dataset.order));
    } else {
      ordered.sort((a, b) => {
        const x = $('.cand', a), y = $('.cand', b);
        if (!x || !y) return !x - !y;
        return byValue(x, y) || (+a.dataset.order - +b.dataset.order);
      });
    }
    ordered.forEach(card => box.appendChild(card));
  }

  const lightbox = $('#lightbox'), lightImg = $('#lightbox-img'), lightCaption = $('#lightbox-caption');
  function openImage(link) {
    if (!link) return;
    lightImg.src = link.getAttribute('href');
    lightImg.alt = link.dataset.caption || '';
    lightCaption.textContent = link.dataset.caption || '';
    lightbox.hidden = false;
  }
  function closeImage() { lightbox.hidden = true; lightImg.removeAttribute('src'); }
  document.addEventListener('click', (event) => {
    const link = event.target.closest('a.thumb, a.ref');
    if (link && !event.ctrlKey && !event.metaKey && !event.shiftKey && event.button === 0) {
      event.preventDefault();
      openImage(link);
    }
  });
  lightbox.addEventListener('click', closeImage);

  Object.values(f).forEach(el => el.addEventListener(el.tagName === 'INPUT' ? 'input' : 'change', () => {
    if (el === f.sort) applySort();
    applyFilters();
  }));
  if (f.cls) f.cls.addEventListener('change', () => {  // keep the instance choice inside the chosen class
    if (f.cls.value && f.inst.value && !f.inst.value.startsWith(f.cls.value + '/')) { f.inst.value = ''; applyFilters(); }
  });
  applyFilters();
  window.catalogReport = {
    applyFilters, openImage, closeImage,
    imageOpen: () => !lightbox.hidden,
    visibleCandidates: () => $$('.cand', box).filter(c => !c.hidden && !c.closest('.card').hidden),
  };
})();
