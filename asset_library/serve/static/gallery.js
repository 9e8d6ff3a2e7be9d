// The search box of the gallery: drop or choose an image, POST it to /similar, show tiles.
(function () {
  "use strict";
  const drop = document.getElementById("drop");
  if (!drop) return;
  const input = document.getElementById("file");
  const options = document.getElementById("options");
  const preview = document.getElementById("query-preview");
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  let current = null;

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
    (children || []).forEach((c) => node.append(c));
    return node;
  }

  function tile(r) {
    const name = String(r.source_uri || "").split("/").pop();
    const img = el("img", { src: "/images/" + r.md5 + "/thumb", alt: name, loading: "lazy" });
    const badge = el("span", { class: "badge" }, [
      r.distance + " bits" + (r.transform && r.transform !== "identity" ? " · " + r.transform : ""),
    ]);
    const meta = el("span", { class: "meta" }, [
      el("span", { class: "name" }, [name]),
      el("span", { class: "dims" }, [r.width + "×" + r.height + " " + (r.format || "")]),
    ]);
    return el("a", { class: "tile", href: "/view/" + r.md5, title: r.source_uri || "" }, [
      el("span", { class: "frame" }, [img, badge]), meta,
    ]);
  }

  async function search(file) {
    current = file;
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    const params = new URLSearchParams();
    const form = new FormData(options);
    for (const [k, v] of form.entries()) if (v !== "") params.set(k, v);
    params.set("limit", "60");
    const body = new FormData();
    body.append("image", file, file.name);
    status.textContent = "Searching…";
    results.replaceChildren();
    try {
      const response = await fetch("/similar?" + params, { method: "POST", body: body });
      const found = await response.json();
      if (!response.ok) {
        status.textContent = typeof found.detail === "string" ? found.detail
          : JSON.stringify(found.detail);
        status.className = "status error";
        return;
      }
      status.className = "status";
      status.textContent = found.count
        ? found.count + " image" + (found.count === 1 ? "" : "s") + " near " + file.name
        : "Nothing near " + file.name + " within the distance.";
      results.replaceChildren(...found.results.map(tile));
    } catch (error) {
      status.textContent = "The search failed: " + error;
      status.className = "status error";
    }
  }

  input.addEventListener("change", () => input.files[0] && search(input.files[0]));
  options.addEventListener("change", () => current && search(current));
  options.addEventListener("submit", (event) => event.preventDefault());
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    const file = event.dataTransfer.files[0];
    if (file) search(file);
  });
})();
