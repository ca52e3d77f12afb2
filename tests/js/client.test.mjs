// The JS dicomweb-client 0.10.4 (the copy OHIF 3.x bundles) against the gateway, under Node.
//
//   GATEWAY_URL=http://127.0.0.1:8080/dicom-web [STOW_FILES=a.dcm:b.dcm] node --test client.test.mjs
//
// GATEWAY_URL is the DICOMweb root of a gateway serving the demo PACS (`dicomweb-gateway demo`);
// STOW_FILES (path-delimiter separated) are PS3.10 files for the STOW test, which is skipped without
// them. tests/integration/test_js_client.py runs this file with both.
//
// The client uses XMLHttpRequest, which Node lacks: a minimal, byte-exact XHR over node:http is
// installed as globalThis.XMLHttpRequest below (method names upper-cased, repeated request headers
// joined with ", ", `Accept: */*` when none is set, response per responseType with the browser's
// rules: 'json' -> parsed or null, 'arraybuffer' -> ArrayBuffer, '' -> text). Multipart answers are
// split by the client's own multipartDecode, exactly as in OHIF. Every exchange is logged in
// `exchanges` so that assertions can look at the request headers OHIF would send.

import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import https from 'node:https';
import fs from 'node:fs';
import path from 'node:path';
import dicomweb from 'dicomweb-client';

const ROOT = (process.env.GATEWAY_URL || '').replace(/\/+$/, '');
if (!ROOT) {
  throw new Error('set GATEWAY_URL to the DICOMweb root, e.g. http://127.0.0.1:8080/dicom-web');
}
const STOW_FILES = (process.env.STOW_FILES || '').split(path.delimiter).filter(Boolean);

// ------------------------------------------------------------------------------ XHR for Node

const exchanges = [];

class NodeXMLHttpRequest {
  static UNSENT = 0;
  static OPENED = 1;
  static HEADERS_RECEIVED = 2;
  static LOADING = 3;
  static DONE = 4;

  constructor() {
    this.readyState = 0;
    this.status = 0;
    this.statusText = '';
    this.response = null;
    this.responseType = '';
    this.withCredentials = false;
    this.upload = {};
    this.onreadystatechange = null;
    this.onloadstart = null;
    this.onprogress = null;
    this.onload = null;
    this.onerror = null;
    this.onloadend = null;
    this._requestHeaders = new Map(); // lower-case name -> [name, value]
    this._responseHeaders = {};
  }

  open(method, url) {
    const upper = String(method).toUpperCase();
    this._method = ['DELETE', 'GET', 'HEAD', 'OPTIONS', 'POST', 'PUT'].includes(upper) ? upper : method;
    this._url = new URL(url);
    this._setState(1);
  }

  setRequestHeader(name, value) {
    const key = name.toLowerCase();
    const previous = this._requestHeaders.get(key);
    this._requestHeaders.set(key, [name, previous ? `${previous[1]}, ${value}` : String(value)]);
  }

  getResponseHeader(name) {
    const value = this._responseHeaders[name.toLowerCase()];
    if (value === undefined) return null;
    return Array.isArray(value) ? value.join(', ') : value;
  }

  getAllResponseHeaders() {
    return Object.entries(this._responseHeaders)
      .map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(', ') : v}\r\n`)
      .join('');
  }

  abort() {
    if (this._request) this._request.destroy();
  }

  send(body) {
    const headers = {};
    for (const [name, value] of this._requestHeaders.values()) headers[name] = value;
    if (!this._requestHeaders.has('accept')) headers.Accept = '*/*';
    let payload = null;
    if (body instanceof ArrayBuffer) payload = Buffer.from(new Uint8Array(body));
    else if (ArrayBuffer.isView(body)) payload = Buffer.from(body.buffer, body.byteOffset, body.byteLength);
    else if (typeof body === 'string') payload = Buffer.from(body, 'utf8');
    if (payload) headers['Content-Length'] = String(payload.length);
    const exchange = { method: this._method, url: this._url.href, requestHeaders: headers,
      requestBody: payload };
    exchanges.push(exchange);
    const transport = this._url.protocol === 'https:' ? https : http;
    if (this.onloadstart) this.onloadstart({ type: 'loadstart' });
    const request = transport.request(this._url, { method: this._method, headers }, (response) => {
      this.status = response.statusCode;
      this.statusText = response.statusMessage || '';
      this._responseHeaders = response.headers;
      exchange.status = this.status;
      exchange.responseHeaders = response.headers;
      this._setState(2);
      const chunks = [];
      let loaded = 0;
      const total = Number(response.headers['content-length'] || 0);
      response.on('data', (chunk) => {
        chunks.push(chunk);
        loaded += chunk.length;
        if (this.readyState !== 3) this._setState(3);
        if (this.onprogress) {
          this.onprogress({ type: 'progress', loaded, total, lengthComputable: total > 0 });
        }
      });
      response.on('end', () => {
        const raw = Buffer.concat(chunks);
        exchange.responseBody = raw;
        this.response = this._decode(raw);
        this._setState(4);
        if (this.onload) this.onload({ type: 'load' });
        if (this.onloadend) this.onloadend({ type: 'loadend' });
      });
      response.on('error', (error) => this._fail(error, exchange));
    });
    this._request = request;
    request.on('error', (error) => this._fail(error, exchange));
    if (payload) request.write(payload);
    request.end();
  }

  _decode(raw) {
    switch (this.responseType) {
      case 'arraybuffer':
        return raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length);
      case 'json':
        if (!raw.length) return null;
        try {
          return JSON.parse(raw.toString('utf8'));
        } catch {
          return null;
        }
      default:
        return raw.toString('utf8');
    }
  }

  _fail(error, exchange) {
    exchange.error = String(error);
    this.status = 0;
    this.response = null;
    this._setState(4);
    if (this.onerror) this.onerror({ type: 'error', error });
    if (this.onloadend) this.onloadend({ type: 'loadend' });
  }

  _setState(state) {
    this.readyState = state;
    if (this.onreadystatechange) this.onreadystatechange({ type: 'readystatechange' });
  }
}

globalThis.XMLHttpRequest = NodeXMLHttpRequest;

// ------------------------------------------------------------------------- helpers

// OHIF's DicomWebDataSource builds its clients like this (extensions/default/src/DicomWebDataSource).
const client = new dicomweb.api.DICOMwebClient({ url: ROOT, verbose: false, headers: {} });
const singlepartClient = new dicomweb.api.DICOMwebClient({
  url: ROOT, verbose: false, headers: {}, singlepart: 'bulkdata,video',
});

// The OHIF default frames Accept (platform/core/src/utils/generateAcceptHeader.ts).
const OHIF_FRAMES_MEDIA = [{ mediaType: 'application/octet-stream', transferSyntaxUID: '*' }];
const OHIF_FRAMES_ACCEPT = 'multipart/related; type="application/octet-stream"; transfer-syntax=*';

const lastExchange = () => exchanges[exchanges.length - 1];
const value = (item, tag) => (item[tag] && item[tag].Value ? item[tag].Value[0] : undefined);
const bytes = (arrayBuffer) => new Uint8Array(arrayBuffer);

async function studyByAccession(accession) {
  const [study] = await client.searchForStudies({ queryParams: { AccessionNumber: accession } });
  assert.ok(study, `no study with AccessionNumber ${accession}`);
  return value(study, '0020000D');
}

async function seriesOf(studyInstanceUID) {
  const series = await client.searchForSeries({ studyInstanceUID });
  series.sort((a, b) => value(a, '00200011') - value(b, '00200011'));
  return series;
}

async function instancesOf(studyInstanceUID, seriesInstanceUID) {
  const instances = await client.searchForInstances({ studyInstanceUID, seriesInstanceUID });
  instances.sort((a, b) => value(a, '00200013') - value(b, '00200013'));
  return instances.map((i) => value(i, '00080018'));
}

// A minimal PS3.10 reader (Explicit or Implicit VR Little Endian datasets, encapsulated or native Pixel
// Data): the top-level elements, nested sequences skipped, encapsulated Pixel Data split into items.
const LONG_VRS = new Set(['OB', 'OD', 'OF', 'OL', 'OV', 'OW', 'SQ', 'SV', 'UC', 'UN', 'UR', 'UT', 'UV']);
const IMPLICIT_VR_LE = '1.2.840.10008.1.2';

function readPart10(arrayBuffer) {
  const data = bytes(arrayBuffer);
  const view = new DataView(arrayBuffer);
  assert.equal(String.fromCharCode(...data.subarray(128, 132)), 'DICM', 'PS3.10 preamble + DICM');
  const elements = new Map();
  let implicit = false; // the file meta group is always explicit
  const tagAt = (o) => ((view.getUint16(o, true) << 16) | view.getUint16(o + 2, true)) >>> 0;

  function skipUndefined(o) { // returns the offset after the sequence delimitation item
    while (o < data.length) {
      const tag = tagAt(o);
      const length = view.getUint32(o + 4, true);
      o += 8;
      if (tag === 0xfffee0dd) return o;
      if (tag === 0xfffee000) o = length === 0xffffffff ? skipItem(o) : o + length;
    }
    throw new Error('unterminated sequence');
  }
  function skipItem(o) { // undefined-length item: elements until the item delimitation
    while (o < data.length) {
      if (tagAt(o) === 0xfffee00d) return o + 8;
      o = readElement(o, null);
    }
    throw new Error('unterminated item');
  }
  function readElement(o, out) {
    const tag = tagAt(o);
    let vr = null;
    let length;
    let start;
    if (implicit && tag >>> 16 !== 0x0002) {
      length = view.getUint32(o + 4, true);
      start = o + 8;
    } else {
      vr = String.fromCharCode(data[o + 4], data[o + 5]);
      if (LONG_VRS.has(vr)) {
        length = view.getUint32(o + 8, true);
        start = o + 12;
      } else {
        length = view.getUint16(o + 6, true);
        start = o + 8;
      }
    }
    if (length === 0xffffffff) {
      if (tag === 0x7fe00010) { // encapsulated pixel data: items until the delimiter
        const fragments = [];
        let p = start;
        for (;;) {
          const itemTag = tagAt(p);
          const itemLength = view.getUint32(p + 4, true);
          p += 8;
          if (itemTag === 0xfffee0dd) break;
          fragments.push(data.subarray(p, p + itemLength));
          p += itemLength;
        }
        if (out) out.set(tag, { vr, fragments: fragments.slice(1) }); // [0] is the offset table
        return p;
      }
      const end = skipUndefined(start);
      if (out) out.set(tag, { vr, value: null });
      return end;
    }
    if (out) out.set(tag, { vr, value: data.subarray(start, start + length) });
    return start + length;
  }
  const text = (tag) => {
    const element = elements.get(tag);
    return element && element.value ? Buffer.from(element.value).toString('latin1').replace(/[\0 ]+$/, '') : undefined;
  };
  let offset = 132;
  while (offset < data.length) {
    if (!implicit && tagAt(offset) >>> 16 !== 0x0002) implicit = text(0x00020010) === IMPLICIT_VR_LE;
    offset = readElement(offset, elements);
  }
  return { elements, text, pixelData: elements.get(0x7fe00010) };
}

// dicomweb-client 0.10.4 cannot pass mediaTypes to retrieveInstance: _getCommonMediaType() returns
// 'application/' and is compared with 'application/dicom', so it always throws. OHIF never passes
// them; to ask for the stored transfer syntax we call the method retrieveInstance would have used.
function retrieveInstanceAs(dicomClient, { studyInstanceUID, seriesInstanceUID, sopInstanceUID }, mediaTypes) {
  const url = `${ROOT}/studies/${studyInstanceUID}/series/${seriesInstanceUID}/instances/${sopInstanceUID}`;
  return dicomClient._httpGetMultipartApplicationDicom(url, mediaTypes, false, false, false).then((parts) => parts[0]);
}

const NATIVE_SYNTAXES = ['1.2.840.10008.1.2', '1.2.840.10008.1.2.1'];

function sameBytes(actual, expected, what) {
  assert.equal(actual.length, expected.length, `${what}: length`);
  assert.ok(Buffer.from(actual).equals(Buffer.from(expected)), `${what}: bytes differ`);
}

// Demo PACS facts (gateway/demo_data.py): these studies exist in every `dicomweb-gateway demo`.
const CT_ACCESSION = 'A2303140011'; // CT, series 2 "Thorax 2.5mm B30f": 24 slices 128x128, Explicit VR LE
const MR_ACCESSION = 'A2206210031'; // MR, series 2 "Ax T2 TSE": 16 slices, RLE Lossless
const MF_ACCESSION = 'A2405270008'; // OT multi-frame: 1 instance, 12 frames 96x96

// ------------------------------------------------------------------------------- QIDO-RS

test('searchForStudies without filters returns every demo study', async () => {
  const studies = await client.searchForStudies();
  assert.ok(Array.isArray(studies));
  const accessions = studies.map((s) => value(s, '00080050'));
  for (const a of [CT_ACCESSION, MR_ACCESSION, MF_ACCESSION]) assert.ok(accessions.includes(a), a);
  assert.ok(studies.length >= 8, 'the 8 demo studies (and what earlier STOW runs added)');
  assert.equal(lastExchange().requestHeaders.Accept, 'application/dicom+json');
  assert.match(lastExchange().responseHeaders['content-type'], /^application\/dicom\+json/);
  for (const study of studies) {
    assert.ok(value(study, '0020000D'), 'StudyInstanceUID');
    const modalities = study['00080061'];
    assert.ok(modalities && modalities.Value && modalities.Value.length, 'ModalitiesInStudy never empty');
  }
});

test('searchForStudies with the filters of the OHIF study list', async () => {
  const ohifParams = { limit: 101, offset: 0, fuzzymatching: false,
    includefield: '00081030,00080060,00080090,00100030' };
  // Only the demo patients (DGW...) count: STOW runs against a long-lived demo add studies.
  const demo = (studies) => studies.filter((s) => String(value(s, '00100020')).startsWith('DGW'));
  const byName = demo(await client.searchForStudies({ queryParams: { PatientName: '*doe*', ...ohifParams } }));
  assert.equal(byName.length, 3, 'Doe^John (2 studies) and DOE^JANE: PN matching is case-insensitive');
  assert.ok(byName.every((s) => s['00081030'] && s['00100030']), 'includefield honoured');
  assert.ok(lastExchange().url.includes('includefield=00081030%2C00080060%2C00080090%2C00100030'));

  const byModality = demo(await client.searchForStudies({ queryParams: { ModalitiesInStudy: 'CT,MR', ...ohifParams } }));
  assert.equal(byModality.length, 5, 'CT or MR');
  const byDate = demo(await client.searchForStudies({ queryParams: { ...ohifParams, StudyDate: '20230101-20231231' } }));
  assert.deepEqual(byDate.map((s) => value(s, '00080020')).sort(), ['20230314', '20231005']);
  const byMrn = await client.searchForStudies({ queryParams: { '00100020': 'DGW0001', ...ohifParams } });
  assert.equal(byMrn.length, 2, 'priors by MRN');
  const ct = await studyByAccession(CT_ACCESSION);
  const byUid = await client.searchForStudies({ queryParams: { ...ohifParams, StudyInstanceUID: ct } });
  assert.deepEqual(byUid.map((s) => value(s, '0020000D')), [ct], 'OHIF opening a study');
  const none = await client.searchForStudies({ queryParams: { PatientID: 'NO-SUCH-PATIENT' } });
  assert.deepEqual(none, [], '204 No Content resolves to []');
  assert.equal(lastExchange().status, 204);
});

test('searchForSeries and searchForInstances', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const series = await client.searchForSeries({ studyInstanceUID: study,
    queryParams: { includefield: '00080021,00080031,0008103E,00200011' } });
  assert.deepEqual(series.map((s) => value(s, '0008103E')).sort(), ['Thorax 2.5mm B30f', 'Topogram 0.6 T20f']);
  const axial = series.find((s) => value(s, '00200011') === 2);
  assert.equal(value(axial, '00201209'), 24, 'NumberOfSeriesRelatedInstances');
  const instances = await client.searchForInstances({ studyInstanceUID: study,
    seriesInstanceUID: value(axial, '0020000E') });
  assert.equal(instances.length, 24);
  assert.ok(instances.every((i) => value(i, '00080018') && value(i, '00080016')));
  const relational = await client.searchForSeries({ queryParams: { Modality: 'PT' } });
  assert.equal(relational.length, 1, 'relational /series search');
});

// ------------------------------------------------------------------------------- WADO-RS

test('retrieveSeriesMetadata and retrieveStudyMetadata (both OHIF lazy-load modes)', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const [, axial] = await seriesOf(study);
  const metadata = await client.retrieveSeriesMetadata({ studyInstanceUID: study,
    seriesInstanceUID: value(axial, '0020000E') });
  assert.equal(metadata.length, 24);
  for (const instance of metadata) {
    assert.equal(value(instance, '00280010'), 128, 'Rows');
    assert.equal(instance['00200032'].Value.length, 3, 'ImagePositionPatient');
    assert.ok(NATIVE_SYNTAXES.includes(value(instance, '00083002')), 'AvailableTransferSyntaxUID: native');
    const pixel = instance['7FE00010'];
    assert.ok(pixel && /^https?:\/\//.test(pixel.BulkDataURI), 'absolute BulkDataURI for Pixel Data');
  }
  const all = await client.retrieveStudyMetadata({ studyInstanceUID: study });
  assert.equal(all.length, 25, 'topogram + 24 axial');
});

test('retrieveInstanceFrames with the OHIF Accept: native frame equals the instance Pixel Data', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const [, axial] = await seriesOf(study);
  const seriesInstanceUID = value(axial, '0020000E');
  const sops = await instancesOf(study, seriesInstanceUID);
  const sopInstanceUID = sops[11];
  const frames = await client.retrieveInstanceFrames({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID, frameNumbers: [1], mediaTypes: OHIF_FRAMES_MEDIA });
  const exchange = lastExchange();
  assert.equal(exchange.requestHeaders.Accept, OHIF_FRAMES_ACCEPT);
  assert.equal(exchange.status, 200);
  assert.match(exchange.responseHeaders['content-type'], /^multipart\/related/);
  // What cornerstone needs in each part's headers (docs/architecture.md, "HTTP edge"): exact
  // 'Content-Type:' with the transfer syntax the metadata announced.
  const [meta] = await client.retrieveInstanceMetadata({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID });
  const head = exchange.responseBody.subarray(0, exchange.responseBody.indexOf('\r\n\r\n')).toString('latin1');
  const label = head.match(/^--\S+\r\nContent-Type: application\/octet-stream; transfer-syntax=([0-9.]+)\r\n/);
  assert.ok(label, head);
  assert.equal(label[1], value(meta, '00083002'));
  assert.equal(frames.length, 1);
  assert.equal(frames[0].byteLength, 128 * 128 * 2);

  const instance = await client.retrieveInstance({ studyInstanceUID: study, seriesInstanceUID, sopInstanceUID });
  assert.equal(lastExchange().requestHeaders.Accept, 'multipart/related; type="application/dicom"');
  const part10 = readPart10(instance);
  assert.equal(part10.text(0x00080018), sopInstanceUID);
  assert.equal(part10.text(0x00020010), '1.2.840.10008.1.2.1');
  sameBytes(bytes(frames[0]), part10.pixelData.value, 'frame 1 vs PixelData');

  // Without mediaTypes the client asks for application/octet-stream (no transfer syntax).
  const plain = await client.retrieveInstanceFrames({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID, frameNumbers: [1] });
  assert.equal(lastExchange().requestHeaders.Accept, 'multipart/related; type="application/octet-stream"');
  sameBytes(bytes(plain[0]), part10.pixelData.value, 'default-Accept frame vs PixelData');
});

test('frames with each Accept spelling OHIF sends (quoted, quoted *, omitQuotationForMultipartRequest)', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const [, axial] = await seriesOf(study);
  const seriesInstanceUID = value(axial, '0020000E');
  const sopInstanceUID = (await instancesOf(study, seriesInstanceUID))[3];
  const url = `${ROOT}/studies/${study}/series/${seriesInstanceUID}/instances/${sopInstanceUID}/frames/1`;
  const reference = await client.retrieveInstanceFrames({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID, frameNumbers: [1], mediaTypes: OHIF_FRAMES_MEDIA });
  const spellings = [
    'multipart/related; type="application/octet-stream"; transfer-syntax="*"',
    'multipart/related; type=application/octet-stream; transfer-syntax=*',
    'multipart/related; type="application/octet-stream"',
  ];
  for (const accept of spellings) {
    // _httpGet is the path every retrieve takes: the answer goes through the same multipartDecode.
    const parts = await client._httpGet(url, { Accept: accept }, 'arraybuffer');
    assert.equal(lastExchange().requestHeaders.Accept, accept);
    assert.equal(lastExchange().status, 200, accept);
    assert.equal(parts.length, 1, accept);
    sameBytes(bytes(parts[0]), bytes(reference[0]), accept);
  }
});

test('thumbnail and rendered as OHIF asks for them (accept= query parameter wins)', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const [, axial] = await seriesOf(study);
  const seriesInstanceUID = value(axial, '0020000E');
  const sopInstanceUID = (await instancesOf(study, seriesInstanceUID))[0];
  const isJpeg = (buffer) => bytes(buffer)[0] === 0xff && bytes(buffer)[1] === 0xd8;
  // thumbnailRendering 'thumbnail': retrieveBulkData of .../thumbnail?accept=image/jpeg.
  const BulkDataURI = `${ROOT}/studies/${study}/series/${seriesInstanceUID}/thumbnail?accept=image/jpeg`;
  const [thumb] = await client.retrieveBulkData({ BulkDataURI });
  assert.equal(lastExchange().requestHeaders.Accept, 'multipart/related; type="application/octet-stream"');
  assert.match(lastExchange().responseHeaders['content-type'], /^image\/jpeg/);
  assert.ok(isJpeg(thumb), 'JPEG');
  const [single] = await singlepartClient.retrieveBulkData({ BulkDataURI });
  assert.ok(isJpeg(single), 'JPEG (singlepart)');
  const ids = { studyInstanceUID: study, seriesInstanceUID, sopInstanceUID };
  const [rendered] = await client.retrieveInstanceRendered({ ...ids, mediaTypes: [{ mediaType: 'image/png' }] });
  assert.equal(lastExchange().requestHeaders.Accept, 'image/png');
  assert.deepEqual([...bytes(rendered).subarray(1, 4)], [0x50, 0x4e, 0x47], 'PNG');
  const [small] = await client.retrieveInstanceThumbnail({ ...ids, mediaTypes: [{ mediaType: 'image/jpeg' }],
    queryParams: { viewport: '64,64' } });
  assert.ok(isJpeg(small), 'JPEG thumbnail');
});

test('retrieveInstanceFrames of an RLE instance brings the stored RLE bytes', async () => {
  const study = await studyByAccession(MR_ACCESSION);
  const [, t2] = await seriesOf(study);
  assert.equal(value(t2, '0008103E'), 'Ax T2 TSE');
  const seriesInstanceUID = value(t2, '0020000E');
  const [sopInstanceUID] = await instancesOf(study, seriesInstanceUID);
  const frames = await client.retrieveInstanceFrames({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID, frameNumbers: [1], mediaTypes: OHIF_FRAMES_MEDIA });
  const head = lastExchange().responseBody.subarray(0, 400).toString('latin1');
  assert.match(head, /Content-Type: [^\r\n]*transfer-syntax=1\.2\.840\.10008\.1\.2\.5\r\n/, head);
  const rle = new DataView(frames[0]);
  assert.equal(rle.getUint32(0, true), 2, 'RLE header: 2 segments for 16-bit grayscale');
  assert.equal(rle.getUint32(4, true), 64, 'RLE header: first segment at 64');

  assert.throws(() => client.retrieveInstance({ studyInstanceUID: study, seriesInstanceUID, sopInstanceUID,
    mediaTypes: [{ mediaType: 'application/dicom' }] }), /not supported for retrieval of instance/,
  '0.10.4 bug (see retrieveInstanceAs); if this starts passing, use retrieveInstance directly');
  const stored = await retrieveInstanceAs(client, { studyInstanceUID: study, seriesInstanceUID, sopInstanceUID },
    [{ mediaType: 'application/dicom', transferSyntaxUID: '*' }]);
  assert.equal(lastExchange().requestHeaders.Accept, 'multipart/related; type="application/dicom"; transfer-syntax=*');
  const part10 = readPart10(stored);
  assert.equal(part10.text(0x00020010), '1.2.840.10008.1.2.5');
  assert.equal(part10.pixelData.fragments.length, 1);
  sameBytes(bytes(frames[0]), part10.pixelData.fragments[0], 'RLE frame vs stored fragment');

  // The default application/dicom is decompressed (lossless -> Explicit VR Little Endian).
  const explicit = readPart10(await client.retrieveInstance({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID }));
  assert.equal(explicit.text(0x00020010), '1.2.840.10008.1.2.1');
  assert.equal(explicit.pixelData.value.length, 128 * 128 * 2);
});

test('retrieveInstanceFrames of a multi-frame instance: several frames, in the order asked', async () => {
  const study = await studyByAccession(MF_ACCESSION);
  const [series] = await seriesOf(study);
  const seriesInstanceUID = value(series, '0020000E');
  const [sopInstanceUID] = await instancesOf(study, seriesInstanceUID);
  const part10 = readPart10(await client.retrieveInstance({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID }));
  const frameBytes = 96 * 96 * 2;
  const frameNumbers = [12, 1, 5];
  const frames = await client.retrieveInstanceFrames({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID, frameNumbers, mediaTypes: OHIF_FRAMES_MEDIA });
  assert.ok(lastExchange().url.endsWith('/frames/12,1,5'));
  assert.equal(frames.length, 3);
  frames.forEach((frame, i) => {
    const n = frameNumbers[i] - 1;
    sameBytes(bytes(frame), part10.pixelData.value.subarray(n * frameBytes, (n + 1) * frameBytes), `frame ${n + 1}`);
  });
});

test('retrieveBulkData of the metadata BulkDataURI, multipart and singlepart (OHIF singlepart: bulkdata)', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const [, axial] = await seriesOf(study);
  const seriesInstanceUID = value(axial, '0020000E');
  const [first] = await client.retrieveSeriesMetadata({ studyInstanceUID: study, seriesInstanceUID });
  const sopInstanceUID = value(first, '00080018');
  const { BulkDataURI } = first['7FE00010'];
  const part10 = readPart10(await client.retrieveInstance({ studyInstanceUID: study, seriesInstanceUID,
    sopInstanceUID }));
  const multipart = await client.retrieveBulkData({ BulkDataURI });
  assert.equal(lastExchange().requestHeaders.Accept, 'multipart/related; type="application/octet-stream"');
  assert.equal(multipart.length, 1);
  sameBytes(bytes(multipart[0]), part10.pixelData.value, 'multipart bulkdata vs PixelData');
  const single = await singlepartClient.retrieveBulkData({ BulkDataURI });
  sameBytes(bytes(single[0]), part10.pixelData.value, 'singlepart bulkdata vs PixelData');
});

test('retrieveSeries: every part is a PS3.10 instance of the series', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  const [, axial] = await seriesOf(study);
  const seriesInstanceUID = value(axial, '0020000E');
  const parts = await client.retrieveSeries({ studyInstanceUID: study, seriesInstanceUID });
  assert.equal(parts.length, 24);
  const uids = parts.map((p) => readPart10(p).text(0x00080018)).sort();
  assert.deepEqual(uids, (await instancesOf(study, seriesInstanceUID)).sort());
});

test('unknown series: the promise rejects with status 404', async () => {
  const study = await studyByAccession(CT_ACCESSION);
  await assert.rejects(client.retrieveSeriesMetadata({ studyInstanceUID: study, seriesInstanceUID: '1.2.3.4.5.6.7' }),
    (error) => error.status === 404);
});

// ------------------------------------------------------------------------------- STOW-RS

test('storeInstances of PS3.10 files, then found by QIDO and retrieved intact', async (t) => {
  if (!STOW_FILES.length) {
    t.skip('set STOW_FILES to PS3.10 files to store');
    return;
  }
  const files = STOW_FILES.map((file) => {
    const buffer = fs.readFileSync(file);
    return buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.length);
  });
  const parsed = files.map(readPart10);
  const studyInstanceUID = parsed[0].text(0x0020000d);
  const seriesInstanceUID = parsed[0].text(0x0020000e);
  const response = await client.storeInstances({ datasets: files });
  const exchange = lastExchange();
  assert.equal(exchange.method, 'POST');
  assert.ok(exchange.url.endsWith('/studies'));
  assert.match(exchange.requestHeaders['Content-Type'], /^multipart\/related; type="application\/dicom"; boundary="/);
  assert.equal(exchange.status, 200, exchange.responseBody.toString());
  assert.match(exchange.responseHeaders['content-type'], /^application\/dicom\+json/);
  const answer = JSON.parse(response);
  assert.equal(answer['00081199'].Value.length, files.length, 'ReferencedSOPSequence');
  assert.equal(answer['00081198'], undefined, 'no FailedSOPSequence');

  const found = await instancesOf(studyInstanceUID, seriesInstanceUID);
  assert.deepEqual(found.sort(), parsed.map((p) => p.text(0x00080018)).sort());
  for (const p of parsed) {
    const back = readPart10(await client.retrieveInstance({ studyInstanceUID, seriesInstanceUID,
      sopInstanceUID: p.text(0x00080018) }));
    sameBytes(back.pixelData.value, p.pixelData.value, 'stored Pixel Data');
  }
  // Study-targeted STOW of the same instance again (OHIF upload re-tries do this).
  const again = JSON.parse(await client.storeInstances({ studyInstanceUID, datasets: [files[0]] }));
  assert.equal(again['00081199'].Value.length, 1);
});
