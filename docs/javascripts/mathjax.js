// MathJax set-up.
// Markdown pages: pymdownx.arithmatex (generic mode) wraps each formula in an element of
// class "arithmatex" with \( \) / \[ \] delimiters; everything else is ignored, as in the
// mkdocs-material docs, so a "$" in prose is never taken for math.
// Tutorial pages (notebooks rendered by mkdocs-jupyter inside .jupyter-wrapper): formulas
// are written $...$ / $$...$$ in plain <p> and <li> elements, so those delimiters are
// enabled there and only code (<pre>, <code>) is skipped. The scripts run at the end of
// <body>, so the page's content is already there to look at.
const notebookPage = document.querySelector(".jupyter-wrapper") !== null;

window.MathJax = {
  tex: {
    inlineMath: notebookPage ? [["$", "$"], ["\\(", "\\)"]] : [["\\(", "\\)"]],
    displayMath: notebookPage ? [["$$", "$$"], ["\\[", "\\]"]] : [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: notebookPage
    ? { ignoreHtmlClass: "tex2jax_ignore", processHtmlClass: "tex2jax_process|arithmatex" }
    : { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex" }
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache()
  MathJax.typesetClear()
  MathJax.texReset()
  MathJax.typesetPromise()
})
