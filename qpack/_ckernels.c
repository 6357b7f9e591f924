/*
 * qpack._ckernels: optional compiled kernels for the hot loops of the codec.
 *
 * Each function computes exactly what the numpy code beside it computes (bit for bit; the
 * tests hold them to that), in one pass and without the GIL, so tensors decode in parallel:
 *
 *   dequantize      codes -> float32 (spec 6.1), reading the codes straight from a packed
 *                   stream (spec 5.1) or from Huffman symbols (spec 5.2): schemes.dequantize
 *                   after bitpack.unpack_codes / entropy.ungroup_symbols
 *   huffman_decode  canonical Huffman symbols and the stream bits they used: entropy's
 *                   decode_symbols
 *   huffman_encode  symbols -> their canonical codewords: entropy.encode_symbols
 *   quantize        float32 -> codes by an affine grid: schemes._codes_into
 *
 * Floating point: every value is two IEEE operations, each rounded (the build passes
 * -ffp-contract=off so that no compiler fuses them, and never -ffast-math).
 * Safety: every buffer length is checked here again, whatever the caller checked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_CODE_LENGTH 15
#define TABLE_BITS 11 /* Huffman lookup table: codewords up to this long in one step */

/* ------------------------------------------------------------------ dequantize */

static inline float
affine(uint32_t q, float scale, float zero)
{
    float diff = (float)q - zero; /* rounded to float32, then the product rounded */
    return scale * diff;
}

static inline uint64_t
load_le(const uint8_t *p, int n)
{
    uint64_t w = 0;
    for (int k = 0; k < n; k++) w |= (uint64_t)p[k] << (8 * k);
    return w;
}

/* Code i of a packed stream of `bits`-bit codes (LSB first), for the unaligned edges. */
static inline uint32_t
packed_code(const uint8_t *src, Py_ssize_t nbytes, int bits, Py_ssize_t i)
{
    Py_ssize_t p = i * bits;
    Py_ssize_t b = p >> 3;
    uint32_t v = src[b];
    if (b + 1 < nbytes) v |= (uint32_t)src[b + 1] << 8;
    return (v >> (p & 7)) & ((1u << bits) - 1);
}

/* Codes [i, end) of a packed stream through the 2**bits value table `t`. `bits` is a
 * literal at every call site, so each width gets its own unrolled loop. */
static inline void
packed_run(const uint8_t *src, Py_ssize_t nbytes, const int bits, Py_ssize_t i,
           Py_ssize_t end, const float *t, float *out)
{
    const uint32_t mask = (1u << bits) - 1;
    for (; i < end && (i & 7); i++) out[i] = t[packed_code(src, nbytes, bits, i)];
    for (; i + 8 <= end; i += 8) { /* eight codes fill exactly `bits` bytes */
        uint64_t w = load_le(src + (i >> 3) * bits, bits);
        for (int j = 0; j < 8; j++) out[i + j] = t[(w >> (bits * j)) & mask];
    }
    for (; i < end; i++) out[i] = t[packed_code(src, nbytes, bits, i)];
}

/* Codes [i, end) held `group` to a symbol byte (group > 1). */
static inline void
symbol_run(const uint8_t *src, const int bits, const int group, Py_ssize_t i,
           Py_ssize_t end, const float *t, float *out)
{
    const uint32_t mask = (1u << bits) - 1;
    for (; i < end && i % group; i++) out[i] = t[(src[i / group] >> (bits * (i % group))) & mask];
    for (; i + group <= end; i += group) {
        uint32_t s = src[i / group];
        for (int j = 0; j < group; j++) out[i + j] = t[(s >> (bits * j)) & mask];
    }
    for (; i < end; i++) out[i] = t[(src[i / group] >> (bits * (i % group))) & mask];
}

static void
dequantize_run(const uint8_t *src, Py_ssize_t nbytes, int bits, int group, Py_ssize_t i,
               Py_ssize_t end, float scale, float zero, float *out)
{
    if (bits == 8) { /* a byte is a code: the values directly, a loop compilers vectorize */
        for (; i < end; i++) out[i] = affine(src[i], scale, zero);
        return;
    }
    float t[256];
    for (uint32_t q = 0; q < (1u << bits); q++) t[q] = affine(q, scale, zero);
    if (group == 1) { /* a byte is a code: any byte value decodes as numpy would */
        for (uint32_t q = 1u << bits; q < 256; q++) t[q] = affine(q, scale, zero);
        for (; i < end; i++) out[i] = t[src[i]];
        return;
    }
    /* symbols of fewer than 8 bits; 8 / bits codes to a byte lie as in a packed stream */
    switch (group * bits < 8 ? bits * 8 + group : 0) { /* literals: unrolled loops */
    case 1 * 8 + 2: symbol_run(src, 1, 2, i, end, t, out); return;
    case 1 * 8 + 3: symbol_run(src, 1, 3, i, end, t, out); return;
    case 1 * 8 + 4: symbol_run(src, 1, 4, i, end, t, out); return;
    case 1 * 8 + 5: symbol_run(src, 1, 5, i, end, t, out); return;
    case 1 * 8 + 6: symbol_run(src, 1, 6, i, end, t, out); return;
    case 1 * 8 + 7: symbol_run(src, 1, 7, i, end, t, out); return;
    case 2 * 8 + 2: symbol_run(src, 2, 2, i, end, t, out); return;
    case 2 * 8 + 3: symbol_run(src, 2, 3, i, end, t, out); return;
    case 3 * 8 + 2: symbol_run(src, 3, 2, i, end, t, out); return;
    default: break;
    }
    switch (bits) {
    case 1: packed_run(src, nbytes, 1, i, end, t, out); return;
    case 2: packed_run(src, nbytes, 2, i, end, t, out); return;
    case 3: packed_run(src, nbytes, 3, i, end, t, out); return;
    case 4: packed_run(src, nbytes, 4, i, end, t, out); return;
    case 5: packed_run(src, nbytes, 5, i, end, t, out); return;
    case 6: packed_run(src, nbytes, 6, i, end, t, out); return;
    default: packed_run(src, nbytes, 7, i, end, t, out); return;
    }
}

static int
float_buffer(Py_buffer *view, const char *what)
{
    if (view->len % 4 || ((uintptr_t)view->buf) % 4) {
        PyErr_Format(PyExc_ValueError, "%s must be aligned float32", what);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(src, bits, group, count, scale, zero, out)\n\n"
"Decode `count` codes of `bits` bits into float32 `out`: codes packed in a stream\n"
"(group 0) or `group` to a symbol byte; run g of count / len(scale) codes decodes as\n"
"scale[g] * (float32(q) - zero[g]).");

static PyObject *
dequantize(PyObject *self, PyObject *args)
{
    Py_buffer src, scale, zero, out;
    int bits, group;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "y*iiny*y*w*", &src, &bits, &group, &count, &scale, &zero, &out))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t groups = scale.len / 4;
    if (!float_buffer(&scale, "scale") || !float_buffer(&zero, "zero") ||
        !float_buffer(&out, "out"))
        goto done;
    if (bits < 1 || bits > 8 || group < 0 || group * bits > 8 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "bad bits, group or count");
        goto done;
    }
    if (zero.len != scale.len || (count && (groups < 1 || count % groups))) {
        PyErr_SetString(PyExc_ValueError, "scale and zero must split the codes into equal runs");
        goto done;
    }
    Py_ssize_t need = group ? count / group + (count % group != 0) : (count * bits + 7) / 8;
    if (src.len < need || out.len / 4 < count) {
        PyErr_SetString(PyExc_ValueError, "buffer too short for the codes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const float *s = scale.buf, *z = zero.buf;
    Py_ssize_t run = count ? count / groups : 0; /* no codes: possibly no groups either */
    for (Py_ssize_t g = 0; g < groups && run; g++)
        dequantize_run(src.buf, src.len, bits, group, g * run, (g + 1) * run, s[g], z[g],
                       out.buf);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&zero);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------ Huffman */

/* Canonical (DEFLATE) codes of the lengths: per-length counts, the symbols in canonical
 * order, and each symbol's codeword. 0 when the lengths are no prefix code. */
typedef struct {
    int count[MAX_CODE_LENGTH + 1];
    uint8_t sorted[256];
    uint16_t code[256];
    int longest;
} Canonical;

static int
canonical(const uint8_t *lengths, Py_ssize_t alphabet, Canonical *c)
{
    memset(c, 0, sizeof *c);
    for (Py_ssize_t s = 0; s < alphabet; s++) {
        if (lengths[s] > MAX_CODE_LENGTH) return 0;
        c->count[lengths[s]]++;
    }
    c->count[0] = 0;
    int32_t left = 1; /* Kraft: codewords still free at each length */
    int first[MAX_CODE_LENGTH + 2] = {0}, offset[MAX_CODE_LENGTH + 2] = {0};
    for (int n = 1; n <= MAX_CODE_LENGTH; n++) {
        left = 2 * left - c->count[n];
        if (left < 0) return 0;
        if (c->count[n]) c->longest = n;
        first[n + 1] = (first[n] + c->count[n]) << 1;
        offset[n + 1] = offset[n] + c->count[n];
    }
    for (Py_ssize_t s = 0; s < alphabet; s++) {
        int n = lengths[s];
        if (n) {
            c->sorted[offset[n]] = (uint8_t)s;
            c->code[s] = (uint16_t)first[n]++;
            offset[n]++;
        }
    }
    return 1;
}

static inline uint32_t
reverse_bits(uint32_t v, int n)
{
    uint32_t r = 0;
    for (int k = 0; k < n; k++) r |= ((v >> k) & 1) << (n - 1 - k);
    return r;
}

/* One symbol from the low bits of `buf` (at least 15 valid) the slow way, bit by bit as
 * RFC 1951's reference decoder does: for codewords longer than the table, and patterns
 * that are no codeword (-1). */
static int
decode_slow(const Canonical *c, uint64_t buf, int *length)
{
    int code = 0, first = 0, index = 0;
    for (int n = 1; n <= MAX_CODE_LENGTH; n++) {
        code |= (int)((buf >> (n - 1)) & 1);
        int count = c->count[n];
        if (code - first < count) {
            *length = n;
            return c->sorted[index + code - first];
        }
        index += count;
        first = (first + count) << 1;
        code <<= 1;
    }
    return -1;
}

PyDoc_STRVAR(huffman_decode_doc,
"huffman_decode(data, lengths, count, out) -> used bits\n\n"
"Decode `count` canonical Huffman symbols into uint8 `out`. ValueError when the lengths\n"
"are no prefix code, the stream ends early or holds a pattern that is no codeword.");

static PyObject *
huffman_decode(PyObject *self, PyObject *args)
{
    Py_buffer data, lengths, out;
    Py_ssize_t count;
    if (!PyArg_ParseTuple(args, "y*y*nw*", &data, &lengths, &count, &out)) return NULL;
    PyObject *result = NULL;
    Canonical c;
    const char *error = NULL;
    if (count < 0 || out.len < count || lengths.len > 256) {
        PyErr_SetString(PyExc_ValueError, "bad count, lengths or output buffer");
        goto done;
    }
    if (!canonical(lengths.buf, lengths.len, &c)) {
        PyErr_SetString(PyExc_ValueError, "code lengths are not a prefix code");
        goto done;
    }
    const uint8_t *src = data.buf;
    Py_ssize_t n = data.len, pos = 0;
    uint64_t buf = 0;
    int have = 0; /* valid bits in buf; bits past the end of the data read as zeros */
    if (count && !c.longest) {
        PyErr_SetString(PyExc_ValueError, "holds symbols but no codewords");
        goto done;
    }
    if (count > 8 * n) { /* every codeword has at least one bit */
        PyErr_SetString(PyExc_ValueError, "ends early");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    /* table[reversed low bits] = symbol | length << 8 for codewords of at most `bits`
     * bits; 0 sends the decoder to decode_slow */
    int bits = c.longest < TABLE_BITS ? c.longest : TABLE_BITS;
    uint16_t table[1 << TABLE_BITS];
    memset(table, 0, sizeof(uint16_t) << bits);
    for (Py_ssize_t s = 0; s < lengths.len; s++) {
        int len = ((const uint8_t *)lengths.buf)[s];
        if (!len || len > bits) continue;
        uint32_t r = reverse_bits(c.code[s], len);
        for (uint32_t k = r; k < (1u << bits); k += 1u << len)
            table[k] = (uint16_t)(s | len << 8);
    }
    const uint64_t mask = ((uint64_t)1 << bits) - 1;
    uint8_t *dst = out.buf;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (have < MAX_CODE_LENGTH) {
            if (pos + 8 <= n) { /* one unaligned load: at least 56 bits */
                buf |= load_le(src + pos, 8) << have;
                pos += (63 - have) >> 3;
                have |= 56;
            } else {
                for (; have <= 56; have += 8, pos++)
                    buf |= (uint64_t)(pos < n ? src[pos] : 0) << have;
            }
        }
        uint32_t entry = table[buf & mask];
        int len, symbol;
        if (entry) {
            symbol = entry & 0xFF;
            len = (int)(entry >> 8);
        } else if ((symbol = decode_slow(&c, buf, &len)) < 0) {
            error = 8 * pos - have > 8 * n ? "ends early" : "holds an invalid codeword";
            break;
        }
        dst[i] = (uint8_t)symbol;
        buf >>= len;
        have -= len;
    }
    Py_END_ALLOW_THREADS
    long long used = 8 * (long long)pos - have;
    if (!error && used > 8 * (long long)n) error = "ends early";
    if (error)
        PyErr_SetString(PyExc_ValueError, error);
    else
        result = PyLong_FromLongLong(used);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(huffman_encode_doc,
"huffman_encode(symbols, lengths, out) -> bits written\n\n"
"Write each symbol's canonical codeword, most significant bit first, into the LSB-first\n"
"stream `out` (uint8), zero-padding the last byte. ValueError when a symbol has no\n"
"codeword or `out` is too short.");

static PyObject *
huffman_encode(PyObject *self, PyObject *args)
{
    Py_buffer symbols, lengths, out;
    if (!PyArg_ParseTuple(args, "y*y*w*", &symbols, &lengths, &out)) return NULL;
    PyObject *result = NULL;
    Canonical c;
    const char *error = NULL;
    if (lengths.len > 256 || !canonical(lengths.buf, lengths.len, &c)) {
        PyErr_SetString(PyExc_ValueError, "code lengths are not a prefix code");
        goto done;
    }
    long long written = 0;
    Py_BEGIN_ALLOW_THREADS
    uint32_t code[256] = {0};
    int size[256] = {0};
    for (Py_ssize_t s = 0; s < lengths.len; s++) {
        size[s] = ((const uint8_t *)lengths.buf)[s];
        code[s] = reverse_bits(c.code[s], size[s]);
    }
    const uint8_t *sym = symbols.buf;
    uint8_t *dst = out.buf;
    Py_ssize_t pos = 0, room = out.len;
    uint64_t buf = 0;
    int have = 0;
    for (Py_ssize_t i = 0; i < symbols.len; i++) {
        int len = size[sym[i]];
        if (!len) {
            error = "a symbol to encode has no codeword (code length 0)";
            break;
        }
        buf |= (uint64_t)code[sym[i]] << have;
        have += len;
        if (have >= 32) {
            if (pos + 4 > room) {
                error = "output buffer too short";
                break;
            }
            for (int k = 0; k < 4; k++) dst[pos++] = (uint8_t)(buf >> (8 * k));
            buf >>= 32;
            have -= 32;
        }
    }
    for (; !error && have > 0; have -= 8, buf >>= 8) {
        if (pos >= room) {
            error = "output buffer too short";
            break;
        }
        dst[pos++] = (uint8_t)buf;
    }
    written = 8 * (long long)pos + (have < 0 ? have : 0);
    Py_END_ALLOW_THREADS
    if (error)
        PyErr_SetString(PyExc_ValueError, error);
    else
        result = PyLong_FromLongLong(written);
done:
    PyBuffer_Release(&symbols);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------ quantize */

PyDoc_STRVAR(quantize_doc,
"quantize(w, scale, zero, top, out)\n\n"
"Affine codes of float32 `w` into uint8 `out`: run g of len(w) / len(scale) values gets\n"
"clip(rint(w / scale[g]) + zero[g], 0, top), in float64 (scale float32, zero float64).");

static PyObject *
quantize(PyObject *self, PyObject *args)
{
    Py_buffer w, scale, zero, out;
    int top;
    if (!PyArg_ParseTuple(args, "y*y*y*iw*", &w, &scale, &zero, &top, &out)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = w.len / 4, groups = scale.len / 4;
    if (!float_buffer(&w, "w") || !float_buffer(&scale, "scale")) goto done;
    if (zero.len % 8 || ((uintptr_t)zero.buf) % 8 || zero.len / 8 != groups) {
        PyErr_SetString(PyExc_ValueError, "zero must be aligned float64, one per scale");
        goto done;
    }
    if (groups < 1 || count % groups || out.len < count || top < 0 || top > 255) {
        PyErr_SetString(PyExc_ValueError, "bad top, or scale and out do not fit w");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const float *src = w.buf, *s = scale.buf;
    const double *z = zero.buf;
    uint8_t *dst = out.buf;
    Py_ssize_t run = count / groups;
    for (Py_ssize_t g = 0; g < groups; g++) {
        double step = s[g], at = z[g], hi = top;
        for (Py_ssize_t i = g * run; i < (g + 1) * run; i++) {
            double t = rint((double)src[i] / step) + at;
            t = t >= 0 ? t : 0; /* (w is finite: the caller checks) */
            t = t > hi ? hi : t;
            dst[i] = (uint8_t)(int)t;
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&zero);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"dequantize", dequantize, METH_VARARGS, dequantize_doc},
    {"huffman_decode", huffman_decode, METH_VARARGS, huffman_decode_doc},
    {"huffman_encode", huffman_encode, METH_VARARGS, huffman_encode_doc},
    {"quantize", quantize, METH_VARARGS, quantize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "qpack._ckernels",
    "Optional compiled kernels; results identical to qpack's numpy code.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ckernels(void)
{
    return PyModule_Create(&module);
}
