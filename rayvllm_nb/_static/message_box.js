// The panel's message box: a text area where Enter sends and Shift+Enter starts a new line.
function render({ model, el }) {
  const box = document.createElement("textarea");
  box.className = "rayvllm-message";
  box.rows = 3;
  box.style.width = "100%";
  box.style.boxSizing = "border-box";
  box.style.resize = "vertical";
  box.placeholder = model.get("placeholder");
  box.value = model.get("value");
  box.disabled = model.get("disabled");
  box.addEventListener("input", () => {
    model.set("value", box.value);
    model.save_changes();
  });
  box.addEventListener("keydown", (event) => {
    // Keys typed here are the box's: JupyterLab must not take Shift+Enter (run cell) or any other.
    event.stopPropagation();
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      model.set("value", box.value);
      model.set("submits", model.get("submits") + 1);
      model.save_changes();
    }
  });
  model.on("change:value", () => {
    if (box.value !== model.get("value")) box.value = model.get("value");
  });
  model.on("change:disabled", () => { box.disabled = model.get("disabled"); });
  el.appendChild(box);
}
export default { render };
