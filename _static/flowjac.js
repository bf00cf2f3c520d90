/* flowjac book: make the sidebar and page-contents buttons work.
   pydata-sphinx-theme 0.17 and sphinx-book-theme 1.3 each bind only the
   first .primary-toggle and .secondary-toggle of the page: pydata's own
   navbar buttons, which the book theme hides. The buttons a reader sees
   (in the article header) were bound to nothing, so at 390 px the sidebar
   and the page contents could not be opened, and at 1,400 px the sidebar
   could not be hidden. Each visible button now presses the bound one, so
   the themes' own code runs: a dialog on a narrow screen, the sidebar
   folded away on a wide one. Following a link of the page contents closes
   the dialog, so the section it leads to is not left covered.
   tests/test_browser.py presses these buttons at 390 px and 1,400 px. */
document.addEventListener("DOMContentLoaded", () => {
  for (const selector of [".primary-toggle", ".secondary-toggle"]) {
    const [bound, ...others] = document.querySelectorAll(selector);
    for (const button of others) {
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        bound.click();
      });
    }
  }
  for (const id of ["pst-primary-sidebar-modal", "pst-secondary-sidebar-modal"]) {
    const dialog = document.getElementById(id);
    if (!dialog) continue;
    dialog.addEventListener("click", (event) => {
      const link = event.target.closest("a[href^='#']");
      if (link && dialog.open) dialog.close();
    });
  }
});
