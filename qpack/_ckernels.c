/*
 * qpack._ckernels: optional compiled kernels for the hot loops of the codec.
 *
 * Each function computes exactly what the numpy code beside it computes (bit for bit; the
 * tests hold them to that), in one pass and without the GIL, so tensors decode in parallel:
 *
 *   pack            codes -> a packed stream (spec 5.1): bitpack.pack_codes
 *   dequantize      codes -> float32 (spec 6.1), reading the codes straight from a packed
 *                   stream (spec 5.1) or from Huffman symbols (spec 5.2): schemes.dequantize
 *                   after bitpack.unpack_codes / entropy.ungroup_symbols
 *   huffman_decode  canonical Huffman symbols and the stream bits they used: entropy's
 *                   decode_symbols
 *   huffman_dequantize  the same, for one code to a symbol, straight to float32 values
 *   huffman_decode_chunks  the same as huffman_decode, for a stream with a chunk index
 *   huffman_encode  symbols -> their canonical codewords: entropy.encode_symbols
 *   histogram       counts of byte values: entropy's histograms of symbols
 *   quantize        float32 -> codes by an affine grid: schemes._codes_into
 *   quantize_errors each row's squared error of w so quantized (its codes if asked),
 *   origin_errors   the same for the origin's per-layer int8 quantizer, and
 *   row_errors      of two arrays' difference: weighterror.py
 *   unit_ranges     the largest and smallest value of each row or group: schemes.unit_ranges
 *
 * dequantize, huffman_dequantize and huffman_decode_chunks also decode a range [first,
 * last) of the codes or symbols alone, into its place in the output: a load decodes one
 * stream with a chunk index in ranges of whole chunks on several threads (reader.py).
 *
 * Floating point: every value is two IEEE operations, each rounded (the build passes
 * -ffp-contract=off so that no compiler fuses them, and never -ffast-math).
 * Safety: every buffer length is checked here again, whatever the caller checked.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The loops that compilers vectorize get an AVX2 build beside the baseline one, chosen
 * when the module loads (GCC's function multi-versioning; elsewhere the baseline only).
 * AVX2 does not imply FMA, and -ffp-contract=off forbids fusing in any case. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

/* Clear the upper halves of the vector registers before a loop with an AVX2 build. A
 * thread may start a kernel with them dirty (left so by code run before it in Python's
 * process; any numpy array operation clears them): the AVX2 dequantize loop then ran
 * 4.5x slower (10.5 against 2.3 ms for 8.4M 4-bit codes on an AVX-512 Xeon), as a split
 * load's ranges, with no numpy call before them, did. VZEROUPPER keeps the low halves. */
static void
clean_upper_vectors(void)
{
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
    if (__builtin_cpu_supports("avx")) __asm__ volatile("vzeroupper");
#endif
}

#if defined(__GNUC__) || defined(__clang__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#elif defined(_MSC_VER)
#define ALWAYS_INLINE __forceinline
#else
#define ALWAYS_INLINE inline
#endif

/* Ask for the cache line `ahead` bytes past p. A sequential pass over a large tensor
 * ran 2-3x faster with it on a VM whose hardware prefetcher did not keep up (8.4M
 * weights: 17.7 against 5.9 ms for quantize_errors); elsewhere it costs next to nothing. */
#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p, ahead) __builtin_prefetch((const char *)(p) + (ahead))
#else
#define PREFETCH(p, ahead) ((void)0)
#endif
#define AHEAD 2048 /* bytes: about a microsecond of reading ahead */

#define MAX_CODE_LENGTH 15
#define TABLE_BITS 12 /* Huffman lookup tables: codewords up to this long in one step */

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

/* The 8 bytes at `p` as a little-endian integer: on a little-endian machine a memcpy,
 * which compilers make one load. (GCC did not merge load_le's bytes inside the Huffman
 * decoders: eight loads, shifts and ORs per refill, 1.3-1.6x slower decoding; for the
 * short constant widths of the packed loops it does better with the bytes.) */
static inline uint64_t
load64_le(const uint8_t *p)
{
#if (defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) || defined(_M_X64) || \
    defined(_M_IX86) || defined(_M_ARM64)
    uint64_t w;
    memcpy(&w, p, 8);
    return w;
#else
    return load_le(p, 8);
#endif
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

/* A large output is written with non-temporal stores where SSE2 has them: it is not read
 * again soon, and a plain store would first read every cache line it fills, doubling the
 * memory traffic of a loop that is bound by it. _mm_sub_ps and _mm_mul_ps are the same
 * two rounded binary32 operations as `affine`. */
#define STREAM_MIN (1 << 18) /* values in a call from which its stores bypass the cache */
#if defined(__SSE2__)
#include <emmintrin.h>
#define HAVE_STREAM 1

/* The values of 16 byte codes, streamed to `out` (16-byte aligned). */
static inline void
stream16(__m128i codes, __m128 scale, __m128 zero, float *out)
{
    const __m128i none = _mm_setzero_si128();
    __m128i lo = _mm_unpacklo_epi8(codes, none), hi = _mm_unpackhi_epi8(codes, none);
    __m128i q[4] = {_mm_unpacklo_epi16(lo, none), _mm_unpackhi_epi16(lo, none),
                    _mm_unpacklo_epi16(hi, none), _mm_unpackhi_epi16(hi, none)};
    for (int k = 0; k < 4; k++)
        _mm_stream_ps(out + 4 * k, _mm_mul_ps(scale, _mm_sub_ps(_mm_cvtepi32_ps(q[k]), zero)));
}

/* Codes [i, end) of bytes holding one (bits 8) or two (bits 4) codes, streamed; returns
 * where it stopped (the caller finishes the last few). */
static Py_ssize_t
stream_run(const uint8_t *src, int bits, Py_ssize_t i, Py_ssize_t end, float scale,
           float zero, float *out)
{
    for (; i < end && ((uintptr_t)(out + i) & 15 || (bits == 4 && i & 1)); i++)
        out[i] = affine(bits == 8 ? src[i] : (src[i >> 1] >> (4 * (i & 1))) & 15, scale, zero);
    const __m128 s = _mm_set1_ps(scale), z = _mm_set1_ps(zero);
    if (bits == 8) {
        for (; i + 16 <= end; i += 16)
            stream16(_mm_loadu_si128((const __m128i *)(src + i)), s, z, out + i);
        return i;
    }
    const __m128i nibble = _mm_set1_epi8(15);
    for (; i + 32 <= end; i += 32) { /* 16 bytes: 32 codes, low nibble first */
        __m128i b = _mm_loadu_si128((const __m128i *)(src + (i >> 1)));
        __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
        stream16(_mm_unpacklo_epi8(lo, hi), s, z, out + i);
        stream16(_mm_unpackhi_epi8(lo, hi), s, z, out + i + 16);
    }
    return i;
}
#endif

VECTOR_CLONES static void
dequantize_run(const uint8_t *src, Py_ssize_t nbytes, int bits, int group, Py_ssize_t i,
               Py_ssize_t end, float scale, float zero, float *out, int stream)
{
#ifdef HAVE_STREAM
    if (stream && (bits == 8 || group == 1 || bits == 4))
        i = stream_run(src, bits == 8 || group == 1 ? 8 : 4, i, end, scale, zero, out);
#else
    (void)stream;
#endif
    /* a byte is a code (8-bit codes, or symbols of one code): the values directly, a loop
     * compilers vectorize; any byte value decodes as numpy would, as through a table */
    if (bits == 8 || group == 1) {
        for (; i < end; i++) out[i] = affine(src[i], scale, zero);
        return;
    }
    if (bits == 4) { /* two codes to a byte: also a vectorized loop */
        if (i < end && (i & 1)) out[i] = affine(src[i >> 1] >> 4, scale, zero), i++;
        const uint8_t *pair = src + (i >> 1);
        float *to = out + i;
        Py_ssize_t pairs = (end - i) >> 1;
        for (Py_ssize_t k = 0; k < pairs; k++) {
            to[2 * k] = affine(pair[k] & 15, scale, zero);
            to[2 * k + 1] = affine(pair[k] >> 4, scale, zero);
        }
        i += 2 * pairs;
        if (i < end) out[i] = affine(src[i >> 1] & 15, scale, zero);
        return;
    }
    float t[256];
    for (uint32_t q = 0; q < (1u << bits); q++) t[q] = affine(q, scale, zero);
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

/* Where the codes of each affine run lie (spec 6.1): rows of `row` codes, each split into
 * runs of `run` codes, the last run of a row possibly short; run g is the (g % per_row)-th
 * of row g / per_row. Tensor and channel granularity: one run per row. */
typedef struct {
    Py_ssize_t row, run, per_row, runs;
} Runs;

static inline void
run_bounds(const Runs *r, Py_ssize_t g, Py_ssize_t *start, Py_ssize_t *end)
{
    Py_ssize_t i = g / r->per_row, j = g % r->per_row;
    Py_ssize_t stop = i * r->row + (j + 1) * r->run, limit = (i + 1) * r->row;
    *start = i * r->row + j * r->run;
    *end = stop < limit ? stop : limit;
}

/* The run holding code i: a range of codes that starts inside a run starts there. */
static inline Py_ssize_t
run_of(const Runs *r, Py_ssize_t i)
{
    return i / r->row * r->per_row + i % r->row / r->run;
}

/* The affine parameters and output of `count` codes: aligned float32 buffers, `scale`
 * and `zero` of one entry per run. `run` 0 splits the codes into equal runs, one per
 * entry; else rows of `row` codes split into runs of `run` (no codes: any number of
 * entries, even none, and no runs). 0 with ValueError set when they do not fit. */
static int
affine_buffers(Py_buffer *scale, Py_buffer *zero, Py_buffer *out, Py_ssize_t count,
               Py_ssize_t row, Py_ssize_t run, Runs *runs)
{
    if (!float_buffer(scale, "scale") || !float_buffer(zero, "zero") ||
        !float_buffer(out, "out"))
        return 0;
    Py_ssize_t groups = scale->len / 4;
    *runs = (Runs){1, 1, 1, 0};
    if (zero->len != scale->len || row < 0 || run < 0) goto bad;
    if (count == 0) return 1;
    if (!run) {
        if (groups < 1 || count % groups) goto bad;
        *runs = (Runs){count / groups, count / groups, 1, groups};
        return 1;
    }
    if (row < 1 || count % row) goto bad;
    Py_ssize_t per_row = row / run + (row % run != 0);
    if (groups != count / row * per_row) goto bad;
    *runs = (Runs){row, run, per_row, groups};
    return 1;
bad:
    PyErr_SetString(PyExc_ValueError, "scale and zero do not fit the codes' runs");
    return 0;
}

/* Pack codes [0, n) of `bits` bits, LSB first (spec 5.1): eight codes fill `bits` bytes;
 * the bytes after the last code's are zero. Literal `bits`: one unrolled loop a width. */
static inline void
pack_run(const uint8_t *codes, Py_ssize_t n, const int bits, uint8_t *out)
{
    const uint32_t mask = (1u << bits) - 1;
    Py_ssize_t i = 0, o = 0;
    for (; i + 8 <= n; i += 8, o += bits) {
        uint64_t w = 0;
        for (int j = 0; j < 8; j++) w |= (uint64_t)(codes[i + j] & mask) << (bits * j);
        for (int k = 0; k < bits; k++) out[o + k] = (uint8_t)(w >> (8 * k));
    }
    uint64_t w = 0;
    int j = 0;
    for (; i < n; i++, j++) w |= (uint64_t)(codes[i] & mask) << (bits * j);
    for (int k = 0; 8 * k < j * bits; k++) out[o + k] = (uint8_t)(w >> (8 * k));
}

PyDoc_STRVAR(pack_doc,
"pack(codes, bits, out)\n\n"
"Pack uint8 `codes` (each below 2**bits; higher bits are dropped) into `out`, which\n"
"must hold ceil(len(codes) * bits / 8) bytes: bitpack.pack_codes.");

static PyObject *
pack(PyObject *self, PyObject *args)
{
    Py_buffer codes, out;
    int bits;
    if (!PyArg_ParseTuple(args, "y*iw*", &codes, &bits, &out)) return NULL;
    PyObject *result = NULL;
    if (bits < 1 || bits > 8 || codes.len > PY_SSIZE_T_MAX / 8) {
        PyErr_SetString(PyExc_ValueError, "bits must be 1 to 8");
    } else if (out.len < (codes.len * bits + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "output buffer too short for the codes");
    } else {
        Py_BEGIN_ALLOW_THREADS
        switch (bits) {
        case 1: pack_run(codes.buf, codes.len, 1, out.buf); break;
        case 2: pack_run(codes.buf, codes.len, 2, out.buf); break;
        case 3: pack_run(codes.buf, codes.len, 3, out.buf); break;
        case 4: pack_run(codes.buf, codes.len, 4, out.buf); break;
        case 5: pack_run(codes.buf, codes.len, 5, out.buf); break;
        case 6: pack_run(codes.buf, codes.len, 6, out.buf); break;
        case 7: pack_run(codes.buf, codes.len, 7, out.buf); break;
        default: pack_run(codes.buf, codes.len, 8, out.buf); break;
        }
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&codes);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(src, bits, group, count, scale, zero, out, row=0, run=0, first=0, last=-1)\n\n"
"Decode `count` codes of `bits` bits into float32 `out`: codes packed in a stream\n"
"(group 0) or `group` to a symbol byte; run g of the codes decodes as\n"
"scale[g] * (float32(q) - zero[g]). Runs: count / len(scale) codes each (run 0), or\n"
"rows of `row` codes split into runs of `run`, the last of a row possibly short.\n"
"Only codes [first, last) are decoded (last -1: count), into the same places of `out`.");

static PyObject *
dequantize(PyObject *self, PyObject *args)
{
    Py_buffer src, scale, zero, out;
    int bits, group;
    Py_ssize_t count, row = 0, run = 0, first = 0, last = -1;
    Runs runs;
    if (!PyArg_ParseTuple(args, "y*iiny*y*w*|nnnn", &src, &bits, &group, &count, &scale, &zero,
                          &out, &row, &run, &first, &last))
        return NULL;
    PyObject *result = NULL;
    if (bits < 1 || bits > 8 || group < 0 || group > 8 / bits || count < 0 ||
        count > PY_SSIZE_T_MAX / 8) {
        PyErr_SetString(PyExc_ValueError, "bad bits, group or count");
        goto done;
    }
    if (!affine_buffers(&scale, &zero, &out, count, row, run, &runs)) goto done;
    Py_ssize_t need = group ? count / group + (count % group != 0) : (count * bits + 7) / 8;
    if (src.len < need || out.len / 4 < count) {
        PyErr_SetString(PyExc_ValueError, "buffer too short for the codes");
        goto done;
    }
    if (last == -1) last = count;
    if (first < 0 || first > last || last > count) {
        PyErr_SetString(PyExc_ValueError, "bad range of codes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    clean_upper_vectors();
    const float *s = scale.buf, *z = zero.buf;
    int stream = last - first >= STREAM_MIN;
    for (Py_ssize_t g = run_of(&runs, first), i = first, start, end; i < last; g++, i = end) {
        run_bounds(&runs, g, &start, &end);
        end = end < last ? end : last;
        dequantize_run(src.buf, src.len, bits, group, i, end, s[g], z[g], out.buf, stream);
    }
#ifdef HAVE_STREAM
    if (stream) _mm_sfence(); /* streamed stores are ordered before the caller reads */
#endif
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

/* The decoder's state: the next bits of the stream, LSB first, in `buf`. */
typedef struct {
    const uint8_t *src;
    Py_ssize_t n, pos; /* bytes, and bytes moved into buf so far */
    uint64_t buf;
    int have; /* valid bits in buf; bits past the end of the data read as zeros */
} Bits;

/* At least 56 valid bits (as in F. Giesen's "reading bits in far too many ways"). */
static inline void
refill(Bits *b)
{
    if (b->pos + 8 <= b->n) { /* one unaligned load; bytes read twice OR the same bits */
        b->buf |= load64_le(b->src + b->pos) << b->have;
        b->pos += (63 - b->have) >> 3;
        b->have |= 56;
    } else {
        for (; b->have <= 56; b->have += 8, b->pos++)
            b->buf |= (uint64_t)(b->pos < b->n ? b->src[b->pos] : 0) << b->have;
    }
}

/* One symbol the slow way (needs 15 valid bits): -1 for a pattern that is no codeword. */
static inline int
decode_one(const Canonical *c, const uint16_t *single, uint64_t mask, Bits *b)
{
    uint32_t e = single[b->buf & mask];
    int len, symbol;
    if (e) {
        symbol = (int)(e >> 8);
        len = (int)(e & 15);
    } else if ((symbol = decode_slow(c, b->buf, &len)) < 0) {
        return -1;
    }
    b->buf >>= len;
    b->have -= len;
    return symbol;
}

/* Lookup tables indexed by the next `bits` stream bits: `single` holds one codeword's
 * length | symbol << 8 (0: longer than `bits`, or no codeword), `multi` as many whole
 * codewords as fit, up to three: their total length in bits 0-3, their number in bits
 * 4-5, the symbols in bytes 1-3. (The length in the low bits: the shift that consumes
 * them needs no other instruction.) */
typedef struct {
    int bits;
    uint64_t mask;
    uint16_t single[1 << TABLE_BITS];
    uint32_t multi[1 << TABLE_BITS];
} Tables;

static void
build_tables(const Canonical *c, const uint8_t *lengths, Py_ssize_t alphabet,
             Py_ssize_t count, Tables *t)
{
    int bits = TABLE_BITS; /* longer than the codewords: room for several */
    if (count < (4 << TABLE_BITS) && c->longest < bits) bits = c->longest; /* cheap build */
    t->bits = bits;
    t->mask = ((uint64_t)1 << bits) - 1;
    memset(t->single, 0, sizeof(uint16_t) << bits);
    for (Py_ssize_t s = 0; s < alphabet; s++) {
        int len = lengths[s];
        if (!len || len > bits) continue;
        for (uint32_t k = reverse_bits(c->code[s], len); k < (1u << bits); k += 1u << len)
            t->single[k] = (uint16_t)(len | s << 8);
    }
    for (uint32_t k = 0; k < (1u << bits); k++) {
        uint32_t entry = 0, at = 0, rest = k;
        int made = 0;
        while (made < 3) {
            uint32_t e = t->single[rest];
            int len = (int)(e & 15);
            if (!e || at + len > (uint32_t)bits) break;
            entry |= (e >> 8) << (8 * ++made);
            at += len;
            rest >>= len;
        }
        t->multi[k] = made ? entry | at | (uint32_t)made << 4 : 0;
    }
}

/* Decode `count` symbols, as bytes into `dst` or, with `values` (256 floats), as
 * values[symbol] into `out`; NULL or the error. Always inlined, so that each caller's
 * choice of output is its own loop. */
static ALWAYS_INLINE const char *
decode_loop(const Canonical *c, const Tables *t, Bits *state, Py_ssize_t count,
            uint8_t *dst, const float *values, float *out)
{
    /* a local copy: the stores to dst may alias *state (char aliasing), which would keep
     * the bit buffer in memory, not in a register */
    Bits local = *state, *b = &local;
    const uint64_t mask = t->mask;
    Py_ssize_t i = 0;
    while (i + 9 <= count) { /* three lookups of at most 15 bits after each refill */
        refill(b);
        for (int step = 0; step < 3; step++) {
            uint32_t e = t->multi[b->buf & mask];
            if (e) {
                if (values) {
                    out[i] = values[(e >> 8) & 0xFF];
                    out[i + 1] = values[(e >> 16) & 0xFF];
                    out[i + 2] = values[e >> 24];
                } else {
                    dst[i] = (uint8_t)(e >> 8);
                    dst[i + 1] = (uint8_t)(e >> 16);
                    dst[i + 2] = (uint8_t)(e >> 24);
                }
                i += (e >> 4) & 3;
                b->buf >>= e & 15;
                b->have -= e & 15;
            } else {
                int symbol = decode_one(c, t->single, mask, b);
                if (symbol < 0) goto invalid;
                if (values)
                    out[i++] = values[symbol];
                else
                    dst[i++] = (uint8_t)symbol;
            }
        }
    }
    for (; i < count; i++) {
        if (b->have < MAX_CODE_LENGTH) refill(b);
        int symbol = decode_one(c, t->single, mask, b);
        if (symbol < 0) goto invalid;
        if (values)
            out[i] = values[symbol];
        else
            dst[i] = (uint8_t)symbol;
    }
    *state = local;
    return NULL;
invalid:
    *state = local;
    return "holds an invalid codeword";
}

static const char *
decode_bytes(const Canonical *c, const Tables *t, Bits *b, Py_ssize_t count, uint8_t *dst)
{
    return decode_loop(c, t, b, count, dst, NULL, NULL);
}

static const char *
decode_values(const Canonical *c, const Tables *t, Bits *b, Py_ssize_t count,
              const float *values, float *out)
{
    return decode_loop(c, t, b, count, NULL, values, out);
}

/* The checks before decoding `count` symbols: NULL or the error. */
static const char *
check_stream(Py_buffer *lengths, Py_ssize_t count, Py_ssize_t nbytes, Canonical *c)
{
    if (count < 0 || lengths->len > 256) return "bad count or lengths";
    if (!canonical(lengths->buf, lengths->len, c)) return "code lengths are not a prefix code";
    if (count && !c->longest) return "holds symbols but no codewords";
    if (count > 8 * nbytes) return "ends early"; /* every codeword has at least one bit */
    return NULL;
}

/* The stream bit of the decoder's next symbol. */
static inline long long
bit_position(const Bits *b)
{
    return 8 * (long long)b->pos - b->have;
}

/* A decoder positioned at stream bit `at` (at most 8 * n). */
static Bits
bits_at(const uint8_t *src, Py_ssize_t n, long long at)
{
    Bits b = {src, n, (Py_ssize_t)(at >> 3), 0, 0};
    refill(&b);
    b.buf >>= at & 7;
    b.have -= (int)(at & 7);
    return b;
}

/* The used bits, or NULL with ValueError set for `error` or a stream that ran past its
 * end (its last codewords lie beyond the data). */
static PyObject *
used_bits(const Bits *b, const char *error)
{
    long long used = bit_position(b);
    if (!error && used > 8 * (long long)b->n) error = "ends early";
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyLong_FromLongLong(used);
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
    Canonical c;
    Bits b = {data.buf, data.len, 0, 0, 0};
    const char *error = check_stream(&lengths, count, data.len, &c);
    if (!error && out.len < count) error = "output buffer too short";
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        Tables t;
        build_tables(&c, lengths.buf, lengths.len, count, &t);
        error = decode_bytes(&c, &t, &b, count, out.buf);
        Py_END_ALLOW_THREADS
    }
    PyObject *result = used_bits(&b, error);
    PyBuffer_Release(&data);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(huffman_dequantize_doc,
"huffman_dequantize(data, lengths, count, scale, zero, out[, chunk, starts, row, run,\n"
"first, last]) -> used bits\n\n"
"huffman_decode of `count` symbols that are one code each (group 1), written as their\n"
"float32 values into `out`: run g of the codes (as in dequantize) decodes as\n"
"scale[g] * (float32(q) - zero[g]). With `chunk` and int64 `starts` (spec 5.2's chunk\n"
"index), checks that each chunk begins where `starts` says. With `first` and `last`\n"
"(last -1: count), decodes symbols [first, last) only, a range of whole chunks, from the\n"
"bit where chunk first / chunk starts, into the same places of `out`; the used bits are\n"
"then where the range ends. The same errors as huffman_decode_chunks.");

/* Chunks of `chunk` symbols in `count` (0 for a chunk of 0: no index); no overflow. */
static inline Py_ssize_t
chunk_count(Py_ssize_t count, Py_ssize_t chunk)
{
    return chunk > 0 ? count / chunk + (count % chunk != 0) : 0;
}

/* The shape of a chunk index with a nonzero `chunk`: NULL, or the error for a chunk below
 * 1 or `starts` not an aligned int64 buffer of one entry per chunk after the first. */
static const char *
index_shape(Py_ssize_t count, Py_ssize_t chunk, const Py_buffer *starts)
{
    Py_ssize_t chunks = chunk_count(count, chunk);
    if (chunk < 0 || !starts->buf || ((uintptr_t)starts->buf & 7) ||
        starts->len != 8 * (chunks ? chunks - 1 : 0))
        return "bad chunk or chunk_starts";
    return NULL;
}

/* The checks of a chunk index of `count` symbols over `nbytes` bytes: its shape and every
 * start inside the stream. NULL or the error; a chunk of 0 means none. */
static const char *
check_index(Py_ssize_t count, Py_ssize_t chunk, Py_buffer *starts, Py_ssize_t nbytes)
{
    if (!chunk) return NULL;
    const char *error = index_shape(count, chunk, starts);
    Py_ssize_t chunks = chunk_count(count, chunk);
    for (Py_ssize_t k = 0; !error && k + 1 < chunks; k++) {
        int64_t at = ((const int64_t *)starts->buf)[k];
        if (at < 0 || at > 8 * (long long)nbytes) error = "bad chunk or chunk_starts";
    }
    return error;
}

/* A range [first, *last) of `count` symbols to decode (a *last of -1 becomes `count`):
 * whole chunks, each end at a chunk boundary or an end of the stream, for only there does
 * the index say at which bit a symbol starts. NULL or the error. */
static const char *
check_range(Py_ssize_t count, Py_ssize_t chunk, Py_ssize_t first, Py_ssize_t *last)
{
    if (*last == -1) *last = count;
    if (first < 0 || first > *last || *last > count ||
        (first && (chunk < 1 || first % chunk)) || (*last < count && (chunk < 1 || *last % chunk)))
        return "bad range of chunks";
    return NULL;
}

static PyObject *
huffman_dequantize(PyObject *self, PyObject *args)
{
    Py_buffer data, lengths, scale, zero, out, starts = {0};
    Py_ssize_t count, row = 0, run = 0, chunk = 0, first = 0, last = -1;
    Runs runs;
    if (!PyArg_ParseTuple(args, "y*y*ny*y*w*|ny*nnnn", &data, &lengths, &count, &scale, &zero,
                          &out, &chunk, &starts, &row, &run, &first, &last))
        return NULL;
    PyObject *result = NULL;
    Canonical c;
    Bits b = {data.buf, data.len, 0, 0, 0};
    if (!affine_buffers(&scale, &zero, &out, count, row, run, &runs)) goto done;
    const char *error = check_stream(&lengths, count, data.len, &c);
    if (!error) error = check_index(count, chunk, &starts, data.len);
    if (!error) error = check_range(count, chunk, first, &last);
    if (!error && out.len / 4 < count) error = "output buffer too short";
    if (!error) {
        Py_BEGIN_ALLOW_THREADS
        Tables t;
        build_tables(&c, lengths.buf, lengths.len, last - first, &t);
        const float *s = scale.buf, *z = zero.buf;
        const int64_t *at = starts.buf;
        Py_ssize_t chunks = chunk_count(count, chunk), k = chunk ? first / chunk : 0;
        if (k) b = bits_at(data.buf, data.len, at[k - 1]);
        /* the next chunk boundary to check (none past the last chunk's start) */
        Py_ssize_t next = k + 1 < chunks ? (k + 1) * chunk : PY_SSIZE_T_MAX;
        float values[256];
        Py_ssize_t i = first, start, end;
        for (Py_ssize_t g = run_of(&runs, first); i < last && !error; g++) {
            run_bounds(&runs, g, &start, &end);
            end = end < last ? end : last;
            /* the alphabet's values only: a run of group granularity holds a few dozen
             * codes, and 256 values a run cost more than decoding them (1.5x slower) */
            for (uint32_t q = 0; q < (uint32_t)lengths.len; q++) values[q] = affine(q, s[g], z[g]);
            while (i < end && !error) {
                Py_ssize_t stop = next < end ? next : end;
                error = decode_values(&c, &t, &b, stop - i, values, (float *)out.buf + i);
                i = stop;
                if (!error && i == next) {
                    if (bit_position(&b) != at[k])
                        error = "does not begin a chunk where chunk_starts says";
                    k++;
                    next = k + 1 < chunks ? next + chunk : PY_SSIZE_T_MAX;
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    result = used_bits(&b, error);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&zero);
    PyBuffer_Release(&out);
    if (starts.obj) PyBuffer_Release(&starts);
    return result;
}

/* Four chunks of `n` symbols (at `dst`, `dst + n`, ...), decoded in lockstep, one symbol
 * of each lane per step (Zstandard's huff0 does the same with four streams): the lanes'
 * lookup chains are independent, so the processor overlaps them, where one chain waits
 * on each lookup. Runs while every lane can load 8 bytes; `done` symbols of each are
 * decoded and the states moved past them. NULL or the error.
 * A lane's step is its critical chain (mask, lookup, shift) plus a store and the sum of
 * lengths beside it. The lane arrays live in registers only when the loops over them are
 * unrolled (hence the pragmas: without them this ran 1.5x slower). Measured slower as
 * well: eight lanes (their registers spill) and a lane position taken from a sentinel bit
 * at each load instead of the sum (it lengthens the chain). */
static const char *
decode_four(const Canonical *c, const Tables *t, Bits *state, Py_ssize_t n, uint8_t *dst,
            Py_ssize_t *done)
{
    const uint8_t *src = state[0].src;
    const uint64_t mask = t->mask;
    const uint16_t *single = t->single;
    const long long last = 8 * (long long)state[0].n - 64; /* lanes load 8 bytes while <= */
    long long at[4];
    uint64_t word[4];
    uint8_t *o = dst; /* lane j writes o[j * n] */
    const uint8_t *end = dst + (n > 2 ? n - 2 : 0); /* steps of three while o < end */
    for (int j = 0; j < 4; j++) at[j] = bit_position(&state[j]);
    while (o < end && at[0] <= last && at[1] <= last && at[2] <= last && at[3] <= last) {
        /* the next 57+ stream bits of each lane: room for three codewords of up to 15 */
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) word[j] = load64_le(src + (at[j] >> 3)) >> (at[j] & 7);
        for (int step = 0; step < 3; step++, o++) {
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                uint32_t e = single[word[j] & mask];
                if (e) {
                    o[j * n] = (uint8_t)(e >> 8);
                    word[j] >>= e & 63; /* the length, bits 0-3 (a shift reads 6 bits) */
                    at[j] += e & 15;
                } else {
                    int len, symbol = decode_slow(c, word[j], &len);
                    if (symbol < 0) return "holds an invalid codeword";
                    o[j * n] = (uint8_t)symbol;
                    word[j] >>= len;
                    at[j] += len;
                }
            }
        }
    }
    for (int j = 0; j < 4; j++) {
        state[j] = bits_at(src, state[j].n, at[j]);
        done[j] = o - dst;
    }
    return NULL;
}

/* Decode chunks [k, stop) of the `count` symbols of a stream with a chunk index (spec
 * 5.2): chunk k holds symbols [k * chunk, (k + 1) * chunk) and starts at bit
 * starts[k - 1]. Every chunk must end exactly where the next starts. With `lanes`, four
 * whole chunks at a time go through decode_four (where codewords average too long for
 * multi-codeword lookups to pay). Sets *used to the end of the last chunk decoded. NULL
 * or the error. */
static const char *
decode_chunks(const Canonical *c, const Tables *t, const uint8_t *src, Py_ssize_t n,
              Py_ssize_t count, Py_ssize_t chunk, const int64_t *starts, int lanes,
              Py_ssize_t k, Py_ssize_t stop, uint8_t *dst, long long *used)
{
    Py_ssize_t chunks = chunk_count(count, chunk);
    Py_ssize_t whole = count / chunk; /* chunks of `chunk` symbols */
    whole = whole < stop ? whole : stop;
    const char *error = NULL;
#define START(k) ((k) ? (long long)starts[(k) - 1] : 0)
    *used = START(k);
#define CHECK_END(k, b)                                                                 \
    do {                                                                                \
        long long end_ = bit_position(b);                                               \
        if ((k) + 1 < chunks && end_ != starts[k])                                      \
            return "does not begin a chunk where chunk_starts says";                    \
        *used = end_;                                                                   \
    } while (0)
    for (; lanes && k + 4 <= whole; k += 4) {
        Bits lane[4];
        Py_ssize_t done[4];
        for (int j = 0; j < 4; j++) lane[j] = bits_at(src, n, START(k + j));
        if ((error = decode_four(c, t, lane, chunk, dst + k * chunk, done))) return error;
        for (int j = 0; j < 4; j++) {
            error = decode_bytes(c, t, &lane[j], chunk - done[j], dst + (k + j) * chunk + done[j]);
            if (error) return error;
            CHECK_END(k + j, &lane[j]);
        }
    }
    for (; k < stop; k++) {
        Bits b = bits_at(src, n, START(k));
        Py_ssize_t size = k + 1 < chunks ? chunk : count - k * chunk;
        if ((error = decode_bytes(c, t, &b, size, dst + k * chunk))) return error;
        CHECK_END(k, &b);
    }
#undef CHECK_END
#undef START
    return NULL;
}

PyDoc_STRVAR(huffman_decode_chunks_doc,
"huffman_decode_chunks(data, lengths, count, chunk, starts, out, lanes[, first, last])\n"
"-> used bits\n\n"
"huffman_decode of a stream with a chunk index (spec 5.2): `starts`, int64, holds the\n"
"stream bit of each chunk of `chunk` symbols after the first. With `lanes` true, four\n"
"chunks decode side by side. With `first` and `last` (last -1: count), decodes symbols\n"
"[first, last) only, a range of whole chunks, into the same places of `out`; the used\n"
"bits are then where the range ends. ValueError as huffman_decode, or when a chunk does\n"
"not end where the next starts.");

static PyObject *
huffman_decode_chunks(PyObject *self, PyObject *args)
{
    Py_buffer data, lengths, starts, out;
    Py_ssize_t count, chunk, first = 0, last = -1;
    int lanes;
    if (!PyArg_ParseTuple(args, "y*y*nny*w*p|nn", &data, &lengths, &count, &chunk, &starts, &out,
                          &lanes, &first, &last))
        return NULL;
    Canonical c;
    long long used = 0;
    const char *error = check_stream(&lengths, count, data.len, &c);
    if (!error) error = chunk < 1 ? "bad chunk or chunk_starts"
                                  : check_index(count, chunk, &starts, data.len);
    if (!error) error = check_range(count, chunk, first, &last);
    if (!error && out.len < count) error = "output buffer too short";
    if (!error && count) {
        Py_BEGIN_ALLOW_THREADS
        Tables t;
        build_tables(&c, lengths.buf, lengths.len, last - first, &t);
        error = decode_chunks(&c, &t, data.buf, data.len, count, chunk, starts.buf, lanes,
                              first / chunk, chunk_count(last, chunk), out.buf, &used);
        Py_END_ALLOW_THREADS
    }
    if (!error && used > 8 * (long long)data.len) error = "ends early";
    PyBuffer_Release(&data);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&out);
    if (error) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    return PyLong_FromLongLong(used);
}

PyDoc_STRVAR(histogram_doc,
"histogram(data, counts)\n\n"
"Add the count of each byte value in `data` to int64 `counts` (256 entries).");

static PyObject *
histogram(PyObject *self, PyObject *args)
{
    Py_buffer data, counts;
    if (!PyArg_ParseTuple(args, "y*w*", &data, &counts)) return NULL;
    PyObject *result = NULL;
    if (counts.len != 256 * 8 || ((uintptr_t)counts.buf) % 8) {
        PyErr_SetString(PyExc_ValueError, "counts must be 256 aligned int64");
    } else {
        Py_BEGIN_ALLOW_THREADS
        /* four tables, so that runs of one value do not wait on their own increments */
        int64_t part[4][256] = {{0}};
        const uint8_t *src = data.buf;
        Py_ssize_t n = data.len, i = 0;
        for (; i + 4 <= n; i += 4) {
            part[0][src[i]]++;
            part[1][src[i + 1]]++;
            part[2][src[i + 2]]++;
            part[3][src[i + 3]]++;
        }
        for (; i < n; i++) part[0][src[i]]++;
        int64_t *total = counts.buf;
        for (int v = 0; v < 256; v++) total[v] += part[0][v] + part[1][v] + part[2][v] + part[3][v];
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&counts);
    return result;
}

PyDoc_STRVAR(huffman_encode_doc,
"huffman_encode(symbols, lengths, out[, chunk, starts]) -> bits written\n\n"
"Write each symbol's canonical codeword, most significant bit first, into the LSB-first\n"
"stream `out` (uint8), zero-padding the last byte. With `chunk`, the bit where each\n"
"run of `chunk` symbols after the first begins goes to int64 `starts` (spec 5.2's chunk\n"
"index). ValueError when a symbol has no codeword or `out` is too short.");

static PyObject *
huffman_encode(PyObject *self, PyObject *args)
{
    Py_buffer symbols, lengths, out, starts = {0};
    Py_ssize_t chunk = 0;
    if (!PyArg_ParseTuple(args, "y*y*w*|nw*", &symbols, &lengths, &out, &chunk, &starts))
        return NULL;
    PyObject *result = NULL;
    Canonical c;
    const char *error = NULL;
    if (lengths.len > 256 || !canonical(lengths.buf, lengths.len, &c)) {
        PyErr_SetString(PyExc_ValueError, "code lengths are not a prefix code");
        goto done;
    }
    if (chunk && (error = index_shape(symbols.len, chunk, &starts))) {
        PyErr_SetString(PyExc_ValueError, error);
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
    Py_ssize_t pos = 0, room = out.len, i = 0, n = symbols.len;
    Py_ssize_t end = chunk && chunk < n ? chunk : n;
    int64_t *at = starts.buf; /* with a chunk: the bit where each chunk after the first starts */
    uint64_t buf = 0;
    int have = 0; /* bits in buf not yet stored whole: fewer than 8 between runs */
    while (!error && i < n) {
        if (i == end) { /* a chunk begins at the next bit */
            *at++ = 8 * (int64_t)pos + have;
            end = end + chunk < n ? end + chunk : n;
        }
        /* three codewords (at most 45 bits) join the up to 7 bits held; then the whole
         * bytes go out in one 8-byte store while it fits, else one byte at a time */
        for (int k = 0; k < 3 && i < end; k++, i++) {
            int len = size[sym[i]];
            if (!len) {
                error = "a symbol to encode has no codeword (code length 0)";
                break;
            }
            buf |= (uint64_t)code[sym[i]] << have;
            have += len;
        }
        if (pos + 8 <= room) {
            for (int k = 0; k < 8; k++) dst[pos + k] = (uint8_t)(buf >> (8 * k));
        } else if (pos + (have >> 3) <= room) {
            for (int k = 0; k < have >> 3; k++) dst[pos + k] = (uint8_t)(buf >> (8 * k));
        } else {
            error = "output buffer too short";
            break;
        }
        pos += have >> 3;
        buf >>= have & ~7; /* at most 52 bits were held */
        have &= 7;
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
    if (starts.obj) PyBuffer_Release(&starts);
    return result;
}

/* ------------------------------------------------------------------ quantize */

/* clip(rint(w / step) + zero, 0, hi) in float64. rint (to nearest, ties to even) as
 * (x + c) - c with c = 2^52 of x's sign, exact for |x| < 2^52 (larger values are whole
 * numbers already), which compilers vectorize where they leave rint a call. */
static inline double
nearest_code(float w, double step, double zero, double hi)
{
    const double two52 = 4503599627370496.0;
    double x = (double)w / step;
    double c = copysign(two52, x);
    double r = fabs(x) < two52 ? (x + c) - c : x;
    double t = r + zero;
    t = t >= 0 ? t : 0;
    return t > hi ? hi : t;
}

VECTOR_CLONES static void
quantize_run(const float *w, Py_ssize_t n, float scale, double zero, int top, uint8_t *out)
{
    const double step = scale, hi = top;
    for (Py_ssize_t start = 0; start < n; start += 64) { /* a vectorized loop a 256 bytes */
        Py_ssize_t end = n - start < 64 ? n : start + 64;
        for (int k = 0; k < 256; k += 64) PREFETCH(w + start, AHEAD + k);
        for (Py_ssize_t i = start; i < end; i++) /* (w is finite: the caller checks) */
            out[i] = (uint8_t)(int)nearest_code(w[i], step, zero, hi);
    }
}

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
    Py_ssize_t run = count / groups;
    clean_upper_vectors();
    for (Py_ssize_t g = 0; g < groups; g++)
        quantize_run((const float *)w.buf + g * run, run, ((const float *)scale.buf)[g],
                     ((const double *)zero.buf)[g], top, (uint8_t *)out.buf + g * run);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&zero);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------ weight errors */

/* The width search's error measure (weighterror.py): per channel row, the sum of squared
 * float32 differences, each squared and added in float64 into one of eight lanes (element
 * k of the row into lane k % 8, in order), the lanes then added as ((0+1)+(2+3))+((4+5)+
 * (6+7)). numpy reproduces that order exactly, so both backends give the same sums. */

/* Add a run of squares, a whole number of eights, into the lanes in order. */
static inline void
add_lanes(const double *sq, Py_ssize_t n, double a[8])
{
    for (Py_ssize_t k = 0; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++) a[j] += sq[k + j];
}

static inline double
lanes_total(const double acc[8])
{
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX2_ERRORS 1

/* Whether the AVX2 loop may run (set at import; QPACK_NO_AVX2=1 holds it back, so that the
 * tests can run the plain loop on a machine that has AVX2). */
static int avx2_errors;

/* Four of grid_errors' values with AVX2 intrinsics (compilers leave its loop scalar, or
 * convert between float and double through memory): _mm256_round_pd to nearest is rint,
 * and min and max clip as the comparisons do (the quotient is never NaN). */
__attribute__((target("avx2"))) static inline __m256d
errors4_avx2(const float *w, __m256d step, __m256d zero, __m256d hi, __m128 scale, __m128 zf,
             __m256d acc, uint8_t *codes)
{
    __m128 v = _mm_loadu_ps(w);
    __m256d x = _mm256_div_pd(_mm256_cvtps_pd(v), step);
    x = _mm256_round_pd(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d t = _mm256_min_pd(_mm256_max_pd(_mm256_add_pd(x, zero), _mm256_setzero_pd()), hi);
    __m128 e = _mm_sub_ps(_mm_mul_ps(scale, _mm_sub_ps(_mm256_cvtpd_ps(t), zf)), v);
    __m256d d = _mm256_cvtps_pd(e);
    if (codes) {
        __m128i q = _mm256_cvtpd_epi32(t);
        q = _mm_packus_epi16(_mm_packus_epi32(q, q), q);
        int32_t four = _mm_cvtsi128_si32(q);
        memcpy(codes, &four, 4);
    }
    return _mm256_add_pd(acc, _mm256_mul_pd(d, d));
}

__attribute__((target("avx2"))) static Py_ssize_t
errors_avx2(const float *w, Py_ssize_t n, float scale, double zero, int top, double acc[8],
            uint8_t *codes)
{
    const __m256d step = _mm256_set1_pd(scale), z = _mm256_set1_pd(zero);
    const __m256d hi = _mm256_set1_pd(top);
    const __m128 s = _mm_set1_ps(scale), zf = _mm_set1_ps((float)zero);
    __m256d a = _mm256_loadu_pd(acc), b = _mm256_loadu_pd(acc + 4);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        PREFETCH(w + i, AHEAD);
        a = errors4_avx2(w + i, step, z, hi, s, zf, a, codes ? codes + i : NULL);
        b = errors4_avx2(w + i + 4, step, z, hi, s, zf, b, codes ? codes + i + 4 : NULL);
    }
    _mm256_storeu_pd(acc, a);
    _mm256_storeu_pd(acc + 4, b);
    _mm256_zeroupper();
    return i;
}
#endif

/* Add the errors of w[0, n) on one grid into the lanes, w[0] going to lane `lane`; the
 * codes to `codes` unless NULL. */
VECTOR_CLONES static void
grid_errors(const float *w, Py_ssize_t n, Py_ssize_t lane, float scale, double zero, int top,
            double acc[8], uint8_t *codes)
{
    const double step = scale, hi = top;
    const float zf = (float)zero;
    Py_ssize_t i = 0;
    for (; i < n && lane % 8; i++, lane++) {
        double t = nearest_code(w[i], step, zero, hi);
        double d = scale * ((float)t - zf) - w[i];
        acc[lane % 8] += d * d;
        if (codes) codes[i] = (uint8_t)(int)t;
    }
#ifdef HAVE_AVX2_ERRORS
    if (avx2_errors) {
        i += errors_avx2(w + i, n - i, scale, zero, top, acc, codes ? codes + i : NULL);
    } else
#endif
    {
        double a[8];
        memcpy(a, acc, sizeof(a));
        for (; i + 8 <= n; i += 8) {
            PREFETCH(w + i, AHEAD);
            for (int j = 0; j < 8; j++) {
                double t = nearest_code(w[i + j], step, zero, hi);
                double d = scale * ((float)t - zf) - w[i + j];
                a[j] += d * d;
                if (codes) codes[i + j] = (uint8_t)(int)t;
            }
        }
        memcpy(acc, a, sizeof(a));
    }
    for (int j = 0; i < n; i++, j++) {
        double t = nearest_code(w[i], step, zero, hi);
        double d = scale * ((float)t - zf) - w[i];
        acc[j] += d * d;
        if (codes) codes[i] = (uint8_t)(int)t;
    }
}

/* The same for the differences of two float32 arrays (b NULL: of a alone). */
VECTOR_CLONES static void
diff_errors(const float *a, const float *b, Py_ssize_t n, double acc[8])
{
    double s[8] = {acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]};
    Py_ssize_t i = 0;
    if (b) {
        for (; i + 8 <= n; i += 8) {
            PREFETCH(a + i, AHEAD);
            PREFETCH(b + i, AHEAD);
            for (int j = 0; j < 8; j++) {
                double d = a[i + j] - b[i + j];
                s[j] += d * d;
            }
        }
        for (int j = 0; i < n; i++, j++) {
            double d = a[i] - b[i];
            s[j] += d * d;
        }
    } else {
        for (; i + 8 <= n; i += 8) {
            PREFETCH(a + i, AHEAD);
            for (int j = 0; j < 8; j++) s[j] += (double)a[i + j] * a[i + j];
        }
        for (int j = 0; i < n; i++, j++) s[j] += (double)a[i] * a[i];
    }
    memcpy(acc, s, sizeof(s));
}

/* float64 `sums` with one entry per channel row of `count` values; 0 (ValueError) else. */
static int
sum_buffer(Py_buffer *sums, Py_ssize_t count, Py_ssize_t *rows)
{
    *rows = sums->len / 8;
    if (sums->len % 8 || ((uintptr_t)sums->buf) % 8 || *rows < 1 || count % *rows) {
        PyErr_SetString(PyExc_ValueError, "sums must be aligned float64, one per row of w");
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(quantize_errors_doc,
"quantize_errors(w, scale, zero, top, sums, row=0, run=0[, codes])\n\n"
"Each channel row's squared error (into float64 `sums`, one per row of float32 `w`) of\n"
"w quantized as `quantize` does and decoded as `dequantize` does: run g of w (runs as in\n"
"dequantize) has grid scale[g] (float32), zero[g] (float64). The codes go to uint8\n"
"`codes` if given.");

static PyObject *
quantize_errors(PyObject *self, PyObject *args)
{
    Py_buffer w, scale, zero, sums, codes = {0};
    int top;
    Py_ssize_t row = 0, run = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*iw*|nnw*", &w, &scale, &zero, &top, &sums, &row, &run,
                          &codes))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = w.len / 4, groups = scale.len / 4, rows;
    Runs runs;
    if (!float_buffer(&w, "w") || !float_buffer(&scale, "scale") ||
        !sum_buffer(&sums, count, &rows))
        goto done;
    if (zero.len % 8 || ((uintptr_t)zero.buf) % 8 || zero.len / 8 != groups || top < 0 ||
        top > 255 || row < 0 || run < 0) {
        PyErr_SetString(PyExc_ValueError, "zero must be aligned float64, one per scale");
        goto done;
    }
    if (codes.obj && codes.len != count) {
        PyErr_SetString(PyExc_ValueError, "codes must hold one byte per value of w");
        goto done;
    }
    if (!run) { /* equal runs */
        if (groups < 1 || count % groups) goto bad;
        runs = (Runs){count / groups, count / groups, 1, groups};
    } else {
        if (row < 1 || count % row) goto bad;
        Py_ssize_t per = row / run + (row % run != 0);
        if (groups != count / row * per) goto bad;
        runs = (Runs){row, run, per, groups};
    }
    Py_BEGIN_ALLOW_THREADS
    clean_upper_vectors();
    const float *src = w.buf, *s = scale.buf;
    const double *z = zero.buf;
    Py_ssize_t length = count / rows;
    for (Py_ssize_t r = 0; r < rows; r++) {
        double acc[8] = {0};
        Py_ssize_t i = r * length, end = i + length;
        while (i < end) {
            Py_ssize_t g = run_of(&runs, i), start, stop;
            run_bounds(&runs, g, &start, &stop);
            stop = stop < end ? stop : end;
            uint8_t *out = codes.obj ? (uint8_t *)codes.buf + i : NULL;
            grid_errors(src + i, stop - i, i - r * length, s[g], z[g], top, acc, out);
            i = stop;
        }
        ((double *)sums.buf)[r] = lanes_total(acc);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
    goto done;
bad:
    PyErr_SetString(PyExc_ValueError, "scale and zero do not fit w's runs");
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&scale);
    PyBuffer_Release(&zero);
    PyBuffer_Release(&sums);
    if (codes.obj) PyBuffer_Release(&codes);
    return result;
}

/* The origin's per-layer quantizer (schemes._symmetric_per_layer), in float32: t = w /
 * peak * half, rounded to nearest even (as (t + c) - c, c = 2^23 of t's sign, exact for
 * |t| < 2^23; larger floats are whole numbers), clipped to [-half, half - 1]; the code
 * t + half decodes as scale * (code - half). The error of each value, as grid_errors. */
VECTOR_CLONES static void
origin_errors_run(const float *w, Py_ssize_t n, float peak, float half, float scale,
                  double acc[8])
{
    const float two23 = 8388608.0f, low = -half, high = half - 1;
    double sq[256], a[8] = {acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]};
    for (Py_ssize_t i = 0; i < n; i += 256) {
        Py_ssize_t m = n - i < 256 ? n - i : 256;
        PREFETCH(w + i, AHEAD);
        for (Py_ssize_t k = 0; k < m; k++) {
            float t = w[i + k] / peak * half;
            float c = copysignf(two23, t);
            t = fabsf(t) < two23 ? (t + c) - c : t;
            t = t < low ? low : t;
            t = t > high ? high : t;
            float d = scale * ((t + half) - half) - w[i + k];
            sq[k] = (double)d * d;
        }
        for (Py_ssize_t k = m; k % 8; k++) sq[k] = 0;
        add_lanes(sq, m + (-m & 7), a);
    }
    memcpy(acc, a, sizeof(a));
}

PyDoc_STRVAR(origin_errors_doc,
"origin_errors(w, peak, bits, sums)\n\n"
"Each channel row's squared error (into float64 `sums`, one per row of float32 `w`) of\n"
"w quantized by the origin's per-layer quantizer (schemes' symmetric-per-layer) with\n"
"largest magnitude `peak` > 0 at `bits` (1-8) bits, decoded as dequantize does.");

static PyObject *
origin_errors(PyObject *self, PyObject *args)
{
    Py_buffer w, sums;
    float peak;
    int bits;
    if (!PyArg_ParseTuple(args, "y*fiw*", &w, &peak, &bits, &sums)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = w.len / 4, rows;
    if (!float_buffer(&w, "w") || !sum_buffer(&sums, count, &rows)) goto done;
    if (bits < 1 || bits > 8 || !(peak > 0) || !isfinite(peak)) {
        PyErr_SetString(PyExc_ValueError, "bits must be 1-8 and peak positive and finite");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    clean_upper_vectors();
    const float half = (float)(1 << (bits - 1)), scale = peak / half;
    Py_ssize_t length = count / rows;
    for (Py_ssize_t r = 0; r < rows; r++) {
        double acc[8] = {0};
        origin_errors_run((const float *)w.buf + r * length, length, peak, half, scale, acc);
        ((double *)sums.buf)[r] = lanes_total(acc);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&sums);
    return result;
}

PyDoc_STRVAR(row_errors_doc,
"row_errors(a, b, sums)\n\n"
"Each channel row's sum of squared differences of float32 `a` and `b` (b empty: of `a`\n"
"alone) into float64 `sums`, one per row, in quantize_errors' order.");

static PyObject *
row_errors(PyObject *self, PyObject *args)
{
    Py_buffer a, b, sums;
    if (!PyArg_ParseTuple(args, "y*y*w*", &a, &b, &sums)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = a.len / 4, rows;
    if (!float_buffer(&a, "a") || !float_buffer(&b, "b") || !sum_buffer(&sums, count, &rows))
        goto done;
    if (b.len && b.len != a.len) {
        PyErr_SetString(PyExc_ValueError, "a and b differ in length");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    clean_upper_vectors();
    Py_ssize_t length = count / rows;
    for (Py_ssize_t r = 0; r < rows; r++) {
        double acc[8] = {0};
        const float *other = b.len ? (const float *)b.buf + r * length : NULL;
        diff_errors((const float *)a.buf + r * length, other, length, acc);
        ((double *)sums.buf)[r] = lanes_total(acc);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&sums);
    return result;
}

PyDoc_STRVAR(unit_ranges_doc,
"unit_ranges(w, row, run, high, low)\n\n"
"The largest and smallest value of each unit of float32 `w` into float32 `high` and\n"
"`low`: rows of `row` values, each split into units of `run`, the last possibly short.");

#if defined(__GNUC__) || defined(__clang__)
/* Eight floats in one vector (GCC's and Clang's vector extensions; two SSE registers
 * in the baseline build), and a lane-wise select: where mask, a, else b. Compilers leave
 * the same loop over an array of eight lanes scalar. */
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

static inline f32x8
select8(i32x8 mask, f32x8 a, f32x8 b)
{
    return (f32x8)(((i32x8)a & mask) | ((i32x8)b & ~mask));
}
#endif

VECTOR_CLONES static void
range_of(const float *w, Py_ssize_t n, float *high, float *low)
{
    float hi = w[0], lo = w[0];
    Py_ssize_t i = 0;
#if defined(__GNUC__) || defined(__clang__)
    if (n >= 8) {
        f32x8 h, l, v;
        memcpy(&h, w, sizeof(h));
        l = h;
        for (i = 8; i + 8 <= n; i += 8) {
            PREFETCH(w + i, AHEAD);
            memcpy(&v, w + i, sizeof(v));
            h = select8(v > h, v, h);
            l = select8(v < l, v, l);
        }
        for (int j = 0; j < 8; j++) {
            hi = h[j] > hi ? h[j] : hi;
            lo = l[j] < lo ? l[j] : lo;
        }
    }
#endif
    for (; i < n; i++) {
        hi = w[i] > hi ? w[i] : hi;
        lo = w[i] < lo ? w[i] : lo;
    }
    *high = hi;
    *low = lo;
}

static PyObject *
unit_ranges(PyObject *self, PyObject *args)
{
    Py_buffer w, high, low;
    Py_ssize_t row, run;
    if (!PyArg_ParseTuple(args, "y*nnw*w*", &w, &row, &run, &high, &low)) return NULL;
    PyObject *result = NULL;
    Py_ssize_t count = w.len / 4;
    if (!float_buffer(&w, "w") || !float_buffer(&high, "high") || !float_buffer(&low, "low"))
        goto done;
    if (row < 1 || run < 1 || count % row) {
        PyErr_SetString(PyExc_ValueError, "row and run must be positive, row divide w");
        goto done;
    }
    Py_ssize_t per = row / run + (row % run != 0), units = count / row * per;
    if (high.len / 4 != units || low.len / 4 != units) {
        PyErr_SetString(PyExc_ValueError, "high and low need one entry per unit");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    clean_upper_vectors();
    const float *src = w.buf;
    for (Py_ssize_t u = 0; u < units; u++) {
        Py_ssize_t k = u / per, j = u % per, start = k * row + j * run;
        Py_ssize_t n = j + 1 < per ? run : row - j * run;
        range_of(src + start, n, (float *)high.buf + u, (float *)low.buf + u);
    }
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&high);
    PyBuffer_Release(&low);
    return result;
}

static PyMethodDef methods[] = {
    {"dequantize", dequantize, METH_VARARGS, dequantize_doc},
    {"pack", pack, METH_VARARGS, pack_doc},
    {"huffman_decode", huffman_decode, METH_VARARGS, huffman_decode_doc},
    {"huffman_dequantize", huffman_dequantize, METH_VARARGS, huffman_dequantize_doc},
    {"huffman_decode_chunks", huffman_decode_chunks, METH_VARARGS, huffman_decode_chunks_doc},
    {"huffman_encode", huffman_encode, METH_VARARGS, huffman_encode_doc},
    {"histogram", histogram, METH_VARARGS, histogram_doc},
    {"quantize", quantize, METH_VARARGS, quantize_doc},
    {"quantize_errors", quantize_errors, METH_VARARGS, quantize_errors_doc},
    {"origin_errors", origin_errors, METH_VARARGS, origin_errors_doc},
    {"row_errors", row_errors, METH_VARARGS, row_errors_doc},
    {"unit_ranges", unit_ranges, METH_VARARGS, unit_ranges_doc},
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
#ifdef HAVE_AVX2_ERRORS
    const char *no = getenv("QPACK_NO_AVX2");
    avx2_errors = __builtin_cpu_supports("avx2") && !(no && *no && strcmp(no, "0"));
#endif
    return PyModule_Create(&module);
}
