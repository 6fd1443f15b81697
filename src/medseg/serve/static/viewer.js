// medseg viewer: upload, job status, NiiVue display of image + label overlay, or of a
// registration job's fixed image with the warped moving image blended over it.
"use strict";
// Distinct label colours (label 1 is pure red: the browser test looks for it).
const COLOURS = [[0, 0, 0], [255, 0, 0], [0, 200, 0], [0, 80, 255], [255, 200, 0], [255, 0, 255],
  [0, 220, 220], [255, 128, 0], [128, 0, 255], [128, 255, 0], [255, 128, 160]];
const params = new URLSearchParams(location.search);
const nv = new niivue.Niivue({ backColor: [0.07, 0.07, 0.07, 1], show3Dcrosshair: true,
  multiplanarShowRender: niivue.SHOW_RENDER.ALWAYS, isResizeCanvas: true,
  crosshairColor: [0.2, 0.6, 1, 1] });  // not red: red is label 1
nv.attachTo("gl");
const statusEl = document.getElementById("status");
const tokenEl = document.getElementById("token");
tokenEl.value = params.get("token") || sessionStorage.getItem("medseg-token") || "";
tokenEl.addEventListener("change", () => sessionStorage.setItem("medseg-token", tokenEl.value));

function headers() {
  return tokenEl.value ? { Authorization: "Bearer " + tokenEl.value } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.detail ? JSON.stringify(body.detail) : response.statusText);
  }
  return response.json();
}

function colour(i) { return COLOURS[i % COLOURS.length]; }

function labelColormap(labels) {
  const max = Math.max(0, ...Object.keys(labels).map(Number));
  const cm = { R: [], G: [], B: [], A: [], I: [], labels: [] };
  for (let i = 0; i <= max; i++) {
    const [r, g, b] = colour(i);
    cm.R.push(r); cm.G.push(g); cm.B.push(b); cm.A.push(i === 0 ? 0 : 255); cm.I.push(i);
    cm.labels.push(i === 0 ? "background" : (labels[i] || "label " + i));
  }
  return cm;
}

function showLegend(result) {
  const body = document.querySelector("#legend tbody");
  body.innerHTML = "";
  for (const [value, name] of Object.entries(result.labels || {})) {
    const [r, g, b] = colour(Number(value));
    const ml = (result.volumes_ml || {})[name];
    const row = document.createElement("tr");
    row.innerHTML = `<td><span class="swatch" style="background:rgb(${r},${g},${b})"></span></td>` +
      `<td></td><td>${ml === undefined ? "" : ml.toFixed(2)}</td>`;
    row.children[1].textContent = name;
    body.appendChild(row);
  }
}

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) return value.map((v) => fmt(v, 2)).join(", ");
  return typeof value === "number" ? String(Number(value.toFixed(digits))) : String(value);
}

function showRegistration(id, result) {
  const q = result.quality || {};
  const lin = result.linear_part || {};
  const rows = [["method", result.method], ["metric", result.metric],
    ["metric value", fmt(result.metric_value, 4)], ["NCC before", fmt(result.ncc_before)],
    ["NCC after", fmt(result.ncc_after)], ["folding %", fmt(q.folding_percent)],
    ["Jacobian min / max", `${fmt(q.jacobian_min)} / ${fmt(q.jacobian_max)}`],
    ["translation (mm)", fmt(lin.translation)], ["seconds", fmt(result.register_seconds, 2)]];
  const body = document.querySelector("#quality tbody");
  body.innerHTML = "";
  for (const [name, value] of rows) {
    const row = body.insertRow();
    row.insertCell().textContent = name;
    row.insertCell().textContent = value;
  }
  // Downloads go through fetch: the token travels in a header, never in a URL.
  const links = document.getElementById("downloads");
  links.innerHTML = "download: ";
  for (const kind of result.results || []) {
    const a = document.createElement("a");
    a.href = "#";
    a.textContent = kind + " ";
    a.addEventListener("click", async (event) => {
      event.preventDefault();
      const response = await fetch(`/jobs/${id}/result/${kind}`, { headers: headers() });
      const blob = await response.blob();
      const name = /filename="?([^";]+)/.exec(response.headers.get("content-disposition") || "");
      const link = document.createElement("a");
      link.href = URL.createObjectURL(blob);
      link.download = name ? name[1] : `${id}_${kind}.json`;
      link.click();
      URL.revokeObjectURL(link.href);
    });
    links.appendChild(a);
  }
}

async function showJob(id) {
  const job = await api(`/jobs/${id}`);
  const result = job.result || {};
  const registration = result.registration;  // {fixed, warped} result names, when a job has one
  const fixed = registration ? registration.fixed : "image";
  const volumes = [{ url: `/jobs/${id}/result/${fixed}`, name: "image.nii.gz", headers: headers() }];
  if (registration) {
    volumes.push({ url: `/jobs/${id}/result/${registration.warped}`, name: "warped.nii.gz",
      headers: headers(), colormap: "warm",
      opacity: Number(document.getElementById("blend").value) });
  } else {
    volumes.push({ url: `/jobs/${id}/result/label`, name: "label.nii.gz", headers: headers(),
      opacity: Number(document.getElementById("opacity").value) });
  }
  // The entropy map (nats, 0 .. ln K) over the labels; near-zero entropy stays transparent.
  const uncertain = !registration && Boolean(result.uncertainty);
  if (uncertain) {
    volumes.push({ url: `/jobs/${id}/result/uncertainty`, name: "uncertainty.nii.gz",
      headers: headers(), colormap: "warm", cal_min: 0.02,
      cal_max: Math.log(Math.max(2, Object.keys(result.labels || {}).length)),
      opacity: Number(document.getElementById("uncertainty").value) });
  }
  await nv.loadVolumes(volumes);
  if (!registration) {
    nv.volumes[1].setColormapLabel(labelColormap(result.labels || {}));
    nv.updateGLVolume();
  }
  document.getElementById("registration").hidden = !registration;
  document.getElementById("legend").hidden = Boolean(registration);
  document.getElementById("opacity").parentElement.hidden = Boolean(registration);  // blend instead
  document.getElementById("uncertainty-row").hidden = !uncertain;
  if (registration) showRegistration(id, result);
  showLegend(result);
  statusEl.textContent = `job ${id.slice(0, 8)}: ${job.status}`;
  document.body.dataset.loaded = id;  // for the browser test
}

async function waitFor(id) {
  for (;;) {
    const job = await api(`/jobs/${id}`);
    statusEl.textContent = `job ${id.slice(0, 8)}: ${job.status} ${Math.round(100 * job.progress)}%`;
    if (job.status === "done") return showJob(id);
    if (["failed", "timeout"].includes(job.status)) throw new Error(job.message || job.status);
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function refreshJobs() {
  try {
    const jobs = await api("/jobs");
    const select = document.getElementById("jobs");
    select.length = 1;
    for (const job of jobs) select.add(new Option(`${job.source} (${job.status})`, job.id));
  } catch (e) { /* token not entered yet */ }
}

document.getElementById("upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  form.append("file", document.getElementById("file").files[0]);
  form.append("deidentify_input", document.getElementById("deid").checked);
  try {
    statusEl.textContent = "uploading…";
    const job = await api("/jobs", { method: "POST", body: form });
    history.replaceState(null, "", `?job=${job.id}`);
    await waitFor(job.id);
    refreshJobs();
  } catch (e) { statusEl.textContent = "error: " + e.message; }
});

document.getElementById("register").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  form.append("fixed", document.getElementById("fixed").files[0]);
  form.append("moving", document.getElementById("moving").files[0]);
  const labels = document.getElementById("moving-labels").files[0];
  if (labels) form.append("moving_labels", labels);
  form.append("method", document.getElementById("method").value);
  try {
    statusEl.textContent = "uploading…";
    const job = await api("/jobs/register", { method: "POST", body: form });
    history.replaceState(null, "", `?job=${job.id}`);
    await waitFor(job.id);
    refreshJobs();
  } catch (e) { statusEl.textContent = "error: " + e.message; }
});

document.getElementById("jobs").addEventListener("change", (e) => {
  if (e.target.value) waitFor(e.target.value).catch((err) => { statusEl.textContent = "error: " + err.message; });
});

document.getElementById("opacity").addEventListener("input", (e) => {
  if (nv.volumes.length > 1) nv.setOpacity(1, Number(e.target.value));
});
document.getElementById("uncertainty").addEventListener("input", (e) => {
  if (nv.volumes.length > 2) nv.setOpacity(2, Number(e.target.value));
});
document.getElementById("blend").addEventListener("input", (e) => {
  if (nv.volumes.length > 1) nv.setOpacity(1, Number(e.target.value));
});

const VIEWS = { multi: nv.sliceTypeMultiplanar, axial: nv.sliceTypeAxial, coronal: nv.sliceTypeCoronal,
  sagittal: nv.sliceTypeSagittal, render: nv.sliceTypeRender };
for (const button of document.querySelectorAll("[data-view]")) {
  button.addEventListener("click", () => {
    document.querySelectorAll("[data-view]").forEach((b) => b.classList.remove("active"));
    button.classList.add("active");
    nv.setSliceType(VIEWS[button.dataset.view]);
  });
}
if (params.get("opacity")) document.getElementById("opacity").value = params.get("opacity");
if (params.get("blend")) document.getElementById("blend").value = params.get("blend");
if (params.get("uncertainty")) document.getElementById("uncertainty").value = params.get("uncertainty");
if (params.get("view")) document.querySelector(`[data-view="${params.get("view")}"]`)?.click();
nv.setSliceType(nv.sliceTypeMultiplanar);
if (params.get("job")) waitFor(params.get("job")).catch((e) => { statusEl.textContent = "error: " + e.message; });
refreshJobs();
