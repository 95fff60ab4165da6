() => {
  // A number typed into a slider's box outside its range: gradio clamps it when the box
  // loses focus (or on Enter) and says nothing, so 5 typed as a temperature silently
  // becomes 2. Say so under the slider, from the first keystroke until the slider is set
  // to a value in range (listeners on the document: gradio may re-create the inputs).
  const noteOf = (block) => block.querySelector(":scope > .range-note");
  const check = (box) => {
    const block = box.closest(".block");
    const range = block && block.querySelector("input[type=range]");
    if (!range) return;
    const [min, max, v] = [parseFloat(range.min), parseFloat(range.max), parseFloat(box.value)];
    let note = noteOf(block);
    if (box.value === "" || Number.isNaN(v) || (v >= min && v <= max)) {
      if (note) note.remove();
      return;
    }
    if (!note) {
      note = document.createElement("p");
      note.className = "range-note";
      note.setAttribute("role", "alert");
      block.appendChild(note);
    }
    const used = v < min ? min : max;
    const side = v < min ? "below the minimum" : "above the maximum";
    note.textContent = `${box.value} is ${side} ${used}: the slider uses ${used}.`;
  };
  document.addEventListener("input", (e) => {
    const t = e.target;
    if (!(t instanceof HTMLInputElement)) return;
    if (t.type === "number") check(t);
    if (t.type === "range" && t.closest(".block")) noteOf(t.closest(".block"))?.remove();
  }, true);
}
