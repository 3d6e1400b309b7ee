// Typeset the \( \) and \[ \] spans that pymdownx.arithmatex (generic mode) leaves, with the
// vendored KaTeX (no network). Runs on every page load, including Material's instant navigation.
(function () {
  function render() {
    var nodes = document.querySelectorAll(".arithmatex");
    for (var i = 0; i < nodes.length; i++) {
      var text = nodes[i].textContent || "";
      var display = text.indexOf("\\[") === 0;
      var body = text.replace(/^\\[\[(]/, "").replace(/\\[\])]$/, "");
      katex.render(body, nodes[i], {displayMode: display, throwOnError: false});
    }
  }
  if (typeof document$ !== "undefined") { document$.subscribe(render); }
  else { document.addEventListener("DOMContentLoaded", render); }
})();
