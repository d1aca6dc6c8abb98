/* A compiled one-pass reader for FHIR NDJSON: parse, check, fingerprint and flatten straight to columns.
 *
 * `Scanner.scan` walks a buffer of many NDJSON lines. For each line of a shape the msgspec fast path
 * (fhir_fast.py) handles it appends exactly the rows, resource key, patient or medication entry that path
 * would append, into Arrow-ready column buffers. Any line it does not fully understand (escapes in a
 * string it must read, unexpected JSON types, nulls, Bundles, other resource types, invalid UTF-8,
 * anything the fast path would defer, a line sampled for validation) stops the scan and is handed back
 * by position, so Python runs its own paths on exactly that line. The reader never decides a reject.
 *
 * Untrusted input: every read is bounds-checked against the line's end, nesting is limited to
 * MAX_DEPTH, and every buffer grows on demand (no fixed-size buffer that input could overflow).
 * Code lookups share the Python dicts of the line-by-line path (systems, code_cache, descriptions), in
 * line order, so the descriptions recorded are the ones that path would record.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__SSE2__)
#include <emmintrin.h> /* every x86-64 CPU has SSE2; elsewhere the byte loops below do the same work */
#endif

#define SCANNER_API 3 /* fhir_scan.py refuses a build of another API version (a stale editable build) */
#define MAX_DEPTH 64                      /* deeper JSON is deferred (msgspec and orjson have limits too) */
#define MAX_LINE_BYTES ((size_t)1 << 30)  /* longer lines are deferred: string offsets stay in int32 */
#define MAX_COLUMN_BYTES ((size_t)1 << 30) /* a batch stops growing here (int32 Arrow offsets) */
#define MAX_CACHE_ENTRIES ((size_t)1 << 20) /* per-scanner caches stop growing (like the Python caches) */
#define PY_CODE_CACHE_LIMIT 1000000       /* Context.code_cache grows only below this size */
#define MAX_NUMBER_CHARS 64               /* longer numbers in a field we read are deferred */
#define EXACT_FLOAT32_INT 16777216        /* |int| <= 2^24 converts to float32 exactly (pyarrow refuses others) */

typedef unsigned char uchar;

/* ------------------------------------------------------------------------------------------------ */
/* growable buffers and Arrow-ready columns                                                          */

/* Memory kept between batches and chunks. A batch's columns are handed to Python without a copy (see
 * Block below) and each chunk has its own Scanner, so without this every batch would start its buffers
 * from fresh memory: on a virtual machine a fresh page costs a fault, a clearing and often a host-side
 * fault (~2-9 us per 4 KB page, more than the reader spends on the page's lines). Blocks go back to this
 * pool when Python releases them and when a Scanner is freed, and buffers take from it before asking
 * malloc. glibc's own knobs (mallopt) would do the same only by changing the whole process for good.
 * Bounded (POOL_SLOTS blocks, POOL_MAX_BYTES); `release_memory()` frees it. Only touched with the GIL held. */
#define POOL_SLOTS 256
#define POOL_MAX_BYTES ((size_t)256 << 20)

static struct {
    char *data;
    size_t cap;
} pool[POOL_SLOTS];
static int pool_count;
static size_t pool_bytes;

/* The smallest pooled block of at least `need` bytes (its capacity in *cap), or NULL. */
static char *pool_take(size_t need, size_t *cap) {
    int best = -1;
    for (int i = 0; i < pool_count; i++)
        if (pool[i].cap >= need && (best < 0 || pool[i].cap < pool[best].cap)) best = i;
    if (best < 0) return NULL;
    char *data = pool[best].data;
    *cap = pool[best].cap;
    pool_bytes -= pool[best].cap;
    pool[best] = pool[--pool_count];
    return data;
}

static void pool_give(char *data, size_t cap) {
    if (!data) return;
    if (pool_count < POOL_SLOTS && cap <= POOL_MAX_BYTES - pool_bytes) {
        pool[pool_count].data = data;
        pool[pool_count].cap = cap;
        pool_count++;
        pool_bytes += cap;
    } else {
        free(data);
    }
}

static void pool_release(void) {
    for (int i = 0; i < pool_count; i++) free(pool[i].data);
    pool_count = 0;
    pool_bytes = 0;
}

typedef struct {
    char *data;
    size_t len, cap;
    size_t hint; /* the capacity this buffer had when its memory was last handed out: start there */
} Buf;

static int buf_reserve(Buf *b, size_t extra) {
    if (extra > SIZE_MAX / 2 - b->len) return -1;
    size_t need = b->len + extra;
    if (need <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : b->hint > 4096 ? b->hint : 4096;
    while (cap < need) cap *= 2;
    size_t pooled_cap;
    char *pooled = pool_take(cap, &pooled_cap);
    if (pooled) {
        if (b->len) memcpy(pooled, b->data, b->len);
        pool_give(b->data, b->cap);
        b->data = pooled;
        b->cap = pooled_cap;
        return 0;
    }
    char *grown = realloc(b->data, cap);
    if (!grown) return -1;
    b->data = grown;
    b->cap = cap;
    return 0;
}

static inline int buf_append(Buf *b, const void *src, size_t n) {
    if (__builtin_expect(b->cap - b->len < n, 0) && buf_reserve(b, n) < 0) return -1;
    if (n) memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static void buf_free(Buf *b) {
    pool_give(b->data, b->cap);
    b->data = NULL;
    b->len = b->cap = 0;
}

/* Bytes handed to Python without a copy (the buffer protocol, read-only); back to the pool when freed. */
typedef struct {
    PyObject_HEAD
    char *data; /* NULL: empty */
    size_t len, cap;
} Block;

static int block_getbuffer(Block *self, Py_buffer *view, int flags) {
    static char empty[1];
    return PyBuffer_FillInfo(view, (PyObject *)self, self->data ? self->data : empty, (Py_ssize_t)self->len, 1, flags);
}

static void block_dealloc(Block *self) {
    pool_give(self->data, self->cap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyBufferProcs block_as_buffer = {.bf_getbuffer = (getbufferproc)block_getbuffer};

static PyTypeObject BlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "odyssey.pipelines._fhir_scan.Block",
    .tp_basicsize = sizeof(Block),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Column bytes from the reader (buffer protocol, read-only); their memory is reused once freed.",
    .tp_dealloc = (destructor)block_dealloc,
    .tp_as_buffer = &block_as_buffer,
};

/* A Block that owns b's memory (b starts over, empty, remembering its size). */
static PyObject *block_from_buf(Buf *b) {
    Block *block = PyObject_New(Block, &BlockType);
    if (!block) return NULL;
    block->data = b->data;
    block->len = b->len;
    block->cap = b->cap;
    b->hint = b->cap;
    b->data = NULL;
    b->len = b->cap = 0;
    return (PyObject *)block;
}

/* A Block of `len` bytes to fill (pooled memory when there is some). */
static PyObject *block_new(size_t len) {
    Buf b = {0};
    if (buf_reserve(&b, len ? len : 1) < 0) return PyErr_NoMemory();
    b.len = len;
    PyObject *block = block_from_buf(&b);
    if (!block) buf_free(&b);
    return block;
}

enum { COL_I64, COL_I32, COL_F32, COL_BOOL, COL_STR };

typedef struct {
    int kind;
    size_t length;
    Buf values;   /* fixed-width values, or string bytes */
    Buf offsets;  /* COL_STR: int64 offset per row + 1 (narrowed on take) */
    Buf validity; /* one byte per row (packed on take) */
} Column;

static int col_start(Column *c) {
    if (c->kind == COL_STR && c->offsets.len == 0) {
        int64_t zero = 0;
        return buf_append(&c->offsets, &zero, sizeof zero);
    }
    return 0;
}

static int col_valid(Column *c, uchar valid) {
    if (buf_append(&c->validity, &valid, 1) < 0) return -1;
    c->length++;
    return 0;
}

static int col_i64(Column *c, int64_t v) {
    return buf_append(&c->values, &v, sizeof v) < 0 ? -1 : col_valid(c, 1);
}

static int col_i32(Column *c, int32_t v) {
    return buf_append(&c->values, &v, sizeof v) < 0 ? -1 : col_valid(c, 1);
}

static int col_f32(Column *c, float v) {
    return buf_append(&c->values, &v, sizeof v) < 0 ? -1 : col_valid(c, 1);
}

static int col_bool(Column *c, int v) {
    uchar byte = v ? 1 : 0;
    return buf_append(&c->values, &byte, 1) < 0 ? -1 : col_valid(c, 1);
}

static int col_null(Column *c) {
    if (c->kind == COL_STR) {
        if (col_start(c) < 0) return -1;
        int64_t end = (int64_t)c->values.len;
        if (buf_append(&c->offsets, &end, sizeof end) < 0) return -1;
    } else {
        static const char zeros[8] = {0};
        size_t width = c->kind == COL_I64 ? 8 : c->kind == COL_BOOL ? 1 : 4;
        if (buf_append(&c->values, zeros, width) < 0) return -1;
    }
    return col_valid(c, 0);
}

static int col_str(Column *c, const char *p, size_t n) {
    if (!p) return col_null(c);
    if (col_start(c) < 0 || buf_append(&c->values, p, n) < 0) return -1;
    int64_t end = (int64_t)c->values.len;
    if (buf_append(&c->offsets, &end, sizeof end) < 0) return -1;
    return col_valid(c, 1);
}

static void col_truncate(Column *c, size_t length) {
    if (length >= c->length) return;
    c->length = length;
    c->validity.len = length;
    if (c->kind == COL_STR) {
        c->offsets.len = (length + 1) * sizeof(int64_t);
        c->values.len = (size_t)((int64_t *)c->offsets.data)[length];
    } else {
        size_t width = c->kind == COL_I64 ? 8 : c->kind == COL_BOOL ? 1 : 4;
        c->values.len = length * width;
    }
}

static void col_free(Column *c) {
    buf_free(&c->values);
    buf_free(&c->offsets);
    buf_free(&c->validity);
    c->length = 0;
}

static void col_reset(Column *c) {
    c->length = 0;
    c->values.len = c->offsets.len = c->validity.len = 0;
}

/* (length, null_count, validity bitmap or None, offsets or None, values) for pyarrow's from_buffers.
 * Values (and 64-bit offsets) are handed over without a copy: the column starts its next batch in other
 * memory (from the pool). */
static PyObject *col_take(Column *c, int large) {
    size_t n = c->length, nulls = 0;
    for (size_t i = 0; i < n; i++) nulls += !c->validity.data[i];
    PyObject *validity = NULL, *offsets = NULL, *values = NULL;
    if (nulls) {
        validity = block_new((n + 7) / 8);
        if (!validity) goto fail;
        uchar *bits = (uchar *)((Block *)validity)->data;
        memset(bits, 0, (n + 7) / 8);
        for (size_t i = 0; i < n; i++)
            if (c->validity.data[i]) bits[i >> 3] |= (uchar)(1u << (i & 7));
    } else {
        validity = Py_NewRef(Py_None);
    }
    if (c->kind == COL_STR) {
        if (col_start(c) < 0) goto fail;
        if (large) {
            offsets = block_from_buf(&c->offsets);
        } else {
            const int64_t *wide = (const int64_t *)c->offsets.data;
            offsets = block_new((n + 1) * sizeof(int32_t));
            if (offsets) {
                int32_t *narrow = (int32_t *)((Block *)offsets)->data;
                for (size_t i = 0; i <= n; i++) narrow[i] = (int32_t)wide[i];
            }
        }
        if (!offsets) goto fail;
        values = block_from_buf(&c->values);
    } else if (c->kind == COL_BOOL) {
        offsets = Py_NewRef(Py_None);
        values = block_new((n + 7) / 8);
        if (values) {
            uchar *bits = (uchar *)((Block *)values)->data;
            memset(bits, 0, (n + 7) / 8);
            for (size_t i = 0; i < n; i++)
                if (c->values.data[i]) bits[i >> 3] |= (uchar)(1u << (i & 7));
        }
    } else {
        offsets = Py_NewRef(Py_None);
        values = block_from_buf(&c->values);
    }
    if (!values) goto fail;
    return Py_BuildValue("(nnNNN)", (Py_ssize_t)n, (Py_ssize_t)nulls, validity, offsets, values);
fail:
    Py_XDECREF(validity);
    Py_XDECREF(offsets);
    Py_XDECREF(values);
    return PyErr_Occurred() ? NULL : PyErr_NoMemory();
}

/* ------------------------------------------------------------------------------------------------ */
/* CRC-32 (the zlib polynomial, reflected), slicing by 8                                            */

static uint32_t crc_table[8][256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++) crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xFF];
}

static uint32_t crc32_tables(uint32_t c, const uchar *p, size_t n) {
    while (n >= 8) {
        uint32_t lo = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        lo ^= c;
        c = crc_table[7][lo & 0xFF] ^ crc_table[6][(lo >> 8) & 0xFF] ^ crc_table[5][(lo >> 16) & 0xFF] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xFF] ^ crc_table[2][(hi >> 8) & 0xFF] ^
            crc_table[1][(hi >> 16) & 0xFF] ^ crc_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n--) c = crc_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_CLMUL_CRC 1
static int cpu_has_clmul;

/* Folding 64 then 16 bytes at a time by carry-less multiplication, then a Barrett reduction (Intel's
 * "Fast CRC computation for generic polynomials using PCLMULQDQ"); constants are powers of x modulo the
 * reflected CRC-32 polynomial. n >= 64, a multiple of 16; c is the running (uninverted) register. */
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_clmul(uint32_t c, const uchar *p, size_t n) {
    const __m128i k64 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k16 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    __m128i x1 = _mm_loadu_si128((const __m128i *)p), x2 = _mm_loadu_si128((const __m128i *)(p + 16));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(p + 32)), x4 = _mm_loadu_si128((const __m128i *)(p + 48));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)c));
    p += 64;
    n -= 64;
#define FOLD(x, k) _mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11))
    while (n >= 64) {
        x1 = _mm_xor_si128(FOLD(x1, k64), _mm_loadu_si128((const __m128i *)p));
        x2 = _mm_xor_si128(FOLD(x2, k64), _mm_loadu_si128((const __m128i *)(p + 16)));
        x3 = _mm_xor_si128(FOLD(x3, k64), _mm_loadu_si128((const __m128i *)(p + 32)));
        x4 = _mm_xor_si128(FOLD(x4, k64), _mm_loadu_si128((const __m128i *)(p + 48)));
        p += 64;
        n -= 64;
    }
    x1 = _mm_xor_si128(FOLD(x1, k16), x2);
    x1 = _mm_xor_si128(FOLD(x1, k16), x3);
    x1 = _mm_xor_si128(FOLD(x1, k16), x4);
    while (n >= 16) {
        x1 = _mm_xor_si128(FOLD(x1, k16), _mm_loadu_si128((const __m128i *)p));
        p += 16;
        n -= 16;
    }
#undef FOLD
    /* 128 -> 64 bits, then 64 -> 32, then the reduction */
    x1 = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(x1, k16, 0x10));
    x2 = _mm_srli_si128(x1, 4);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), k5, 0x00), x2);
    x2 = x1;
    x1 = _mm_and_si128(_mm_clmulepi64_si128(_mm_and_si128(x1, mask32), poly, 0x10), mask32);
    x1 = _mm_xor_si128(_mm_clmulepi64_si128(x1, poly, 0x00), x2);
    return (uint32_t)_mm_extract_epi32(x1, 1);
}
#endif

/* zlib's crc32 of a buffer */
static uint32_t crc32_of(const uchar *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
#ifdef HAVE_CLMUL_CRC
    if (cpu_has_clmul && n >= 64) {
        size_t folded = n & ~(size_t)15;
        c = crc32_clmul(c, p, folded);
        p += folded;
        n -= folded;
    }
#endif
    return crc32_tables(c, p, n) ^ 0xFFFFFFFFu;
}

/* ------------------------------------------------------------------------------------------------ */
/* BLAKE2b with an 8-byte digest (RFC 7693): the stable ids of fhir_flatten.stable_id                */

static const uint64_t blake_iv[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uchar blake_sigma[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

typedef struct {
    uint64_t h[8], t;
    uchar block[128];
    size_t fill;
} Blake;

static uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static uint64_t load64(const uchar *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

#define BLAKE_G(a, b, c, d, x, y)         \
    do {                                  \
        v[a] = v[a] + v[b] + (x);         \
        v[d] = rotr64(v[d] ^ v[a], 32);   \
        v[c] = v[c] + v[d];               \
        v[b] = rotr64(v[b] ^ v[c], 24);   \
        v[a] = v[a] + v[b] + (y);         \
        v[d] = rotr64(v[d] ^ v[a], 16);   \
        v[c] = v[c] + v[d];               \
        v[b] = rotr64(v[b] ^ v[c], 63);   \
    } while (0)

static void blake_compress(Blake *s, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(s->block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = blake_iv[i];
    }
    v[12] ^= s->t; /* inputs here stay far below 2^64 bytes: the high counter word is always 0 */
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uchar *z = blake_sigma[r];
        BLAKE_G(0, 4, 8, 12, m[z[0]], m[z[1]]);
        BLAKE_G(1, 5, 9, 13, m[z[2]], m[z[3]]);
        BLAKE_G(2, 6, 10, 14, m[z[4]], m[z[5]]);
        BLAKE_G(3, 7, 11, 15, m[z[6]], m[z[7]]);
        BLAKE_G(0, 5, 10, 15, m[z[8]], m[z[9]]);
        BLAKE_G(1, 6, 11, 12, m[z[10]], m[z[11]]);
        BLAKE_G(2, 7, 8, 13, m[z[12]], m[z[13]]);
        BLAKE_G(3, 4, 9, 14, m[z[14]], m[z[15]]);
    }
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

static void blake_init(Blake *s) {
    memcpy(s->h, blake_iv, sizeof s->h);
    s->h[0] ^= 0x01010000ULL ^ 8; /* depth 1, fanout 1, no key, 8-byte digest */
    s->t = 0;
    s->fill = 0;
}

static void blake_update(Blake *s, const uchar *p, size_t n) {
    while (n) {
        if (s->fill == 128) { /* the last block is compressed only in blake_final */
            s->t += 128;
            blake_compress(s, 0);
            s->fill = 0;
        }
        size_t take = 128 - s->fill < n ? 128 - s->fill : n;
        memcpy(s->block + s->fill, p, take);
        s->fill += take;
        p += take;
        n -= take;
    }
}

/* fhir_flatten.stable_id: BLAKE2b-64 of the text, read little-endian, shifted right by one bit. */
static int64_t blake_final_id(Blake *s) {
    s->t += s->fill;
    memset(s->block + s->fill, 0, 128 - s->fill);
    blake_compress(s, 1);
    return (int64_t)(s->h[0] >> 1);
}

static int64_t stable_id2(const char *a, size_t na, const char *b, size_t nb) {
    Blake s;
    blake_init(&s);
    blake_update(&s, (const uchar *)a, na);
    blake_update(&s, (const uchar *)b, nb);
    return blake_final_id(&s);
}

/* ------------------------------------------------------------------------------------------------ */
/* a byte-string -> value hash map (open addressing), for the per-scanner caches                     */

typedef struct {
    uint64_t hash;
    size_t key_at, key_len; /* in the arena */
    int64_t value;          /* an id, or an offset into the arena for interned strings */
    size_t value_len;
    int used;
} Slot;

typedef struct {
    Slot *slots;
    size_t cap, count;
    Buf arena;
} Map;

static uint64_t hash_bytes(const uchar *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL ^ n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0x100000001b3ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    while (n--) h = (h ^ *p++) * 0x100000001b3ULL;
    h ^= h >> 32;
    return h * 0x9E3779B97F4A7C15ULL;
}

static Slot *map_find(Map *m, const uchar *key, size_t n, uint64_t h) {
    if (!m->cap) return NULL;
    size_t mask = m->cap - 1;
    for (size_t i = (size_t)h & mask;; i = (i + 1) & mask) {
        Slot *s = &m->slots[i];
        if (!s->used) return s;
        if (s->hash == h && s->key_len == n && memcmp(m->arena.data + s->key_at, key, n) == 0) return s;
    }
}

static void map_clear(Map *m) {
    free(m->slots);
    m->slots = NULL;
    m->cap = m->count = 0;
    buf_free(&m->arena);
}

/* Insert (key -> value, optional interned bytes); a full cache is cleared first (its values are pure
 * functions of the key, so forgetting them changes nothing but speed). Returns the slot or NULL. */
static Slot *map_put(Map *m, const uchar *key, size_t n, uint64_t h, int64_t value, const char *extra,
                     size_t extra_len) {
    if (m->count >= MAX_CACHE_ENTRIES) map_clear(m);
    if ((m->count + 1) * 2 > m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 1024;
        Slot *slots = calloc(cap, sizeof(Slot));
        if (!slots) return NULL;
        for (size_t i = 0; i < m->cap; i++) {
            if (!m->slots[i].used) continue;
            size_t j = (size_t)m->slots[i].hash & (cap - 1);
            while (slots[j].used) j = (j + 1) & (cap - 1);
            slots[j] = m->slots[i];
        }
        free(m->slots);
        m->slots = slots;
        m->cap = cap;
    }
    Slot *s = map_find(m, key, n, h);
    if (s->used) return s;
    size_t at = m->arena.len;
    if (buf_append(&m->arena, key, n) < 0) return NULL;
    size_t extra_at = m->arena.len;
    if (extra && buf_append(&m->arena, extra, extra_len) < 0) return NULL;
    s->used = 1;
    s->hash = h;
    s->key_at = at;
    s->key_len = n;
    s->value = extra ? (int64_t)extra_at : value;
    s->value_len = extra_len;
    m->count++;
    return s;
}

/* ------------------------------------------------------------------------------------------------ */
/* JSON: validation of a whole line, then reading only the fields Odyssey needs                      */

enum { J_NONE = 0, J_STR, J_NUM, J_OBJ, J_ARR, J_TRUE, J_FALSE, J_NULL };

typedef struct {
    const uchar *s, *e; /* strings: the text between the quotes; others: the value's bytes */
    int type;
    int escaped; /* a string holding a backslash escape */
} Val;

static inline const uchar *skip_ws(const uchar *p, const uchar *end) {
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) p++;
    return p;
}

static int hexval(uchar c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* p at the opening quote; returns the byte after the closing quote, or NULL. Escapes are checked for
 * grammar; a \u escape naming a surrogate is refused (JSON parsers disagree about lone ones). */
static inline __attribute__((always_inline)) const uchar *scan_string(const uchar *p, const uchar *end, Val *out) {
    const uchar *start = ++p;
    int escaped = 0;
    for (;;) {
#if defined(__SSE2__)
        /* 16 bytes at a time up to the next quote, backslash or control byte */
        const __m128i quote = _mm_set1_epi8('"'), backslash = _mm_set1_epi8('\\'), control = _mm_set1_epi8(0x1F);
        while (end - p >= 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)p);
            __m128i hit = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, quote), _mm_cmpeq_epi8(v, backslash)),
                                       _mm_cmpeq_epi8(_mm_max_epu8(v, control), control));
            int mask = _mm_movemask_epi8(hit);
            if (mask) {
                p += __builtin_ctz((unsigned)mask);
                break;
            }
            p += 16;
        }
#endif
        if (p >= end) return NULL;
        uchar c = *p;
        if (c == '"') break;
        if (c < 0x20) return NULL;
        if (c == '\\') {
            escaped = 1;
            if (end - p < 2) return NULL;
            uchar k = p[1];
            if (k == 'u') {
                if (end - p < 6) return NULL;
                int v = 0;
                for (int i = 2; i < 6; i++) {
                    int h = hexval(p[i]);
                    if (h < 0) return NULL;
                    v = v * 16 + h;
                }
                if (v >= 0xD800 && v <= 0xDFFF) return NULL;
                p += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", k) || k == 0) return NULL;
            p += 2;
            continue;
        }
        p++;
    }
    if (out) {
        out->s = start;
        out->e = p;
        out->type = J_STR;
        out->escaped = escaped;
    }
    return p + 1;
}

static const uchar *scan_number(const uchar *p, const uchar *end) {
    if (p < end && *p == '-') p++;
    if (p >= end) return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return NULL;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    return p;
}

static const uchar *scan_literal(const uchar *p, const uchar *end, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(end - p) < n || memcmp(p, word, n) != 0) return NULL;
    return p + n;
}

/* One JSON value at p (no leading whitespace); returns the byte after it, or NULL when invalid. */
static const uchar *scan_value(const uchar *p, const uchar *end, int depth, Val *out) {
    if (p >= end || depth > MAX_DEPTH) return NULL;
    const uchar *start = p, *after;
    int type;
    switch (*p) {
    case '"':
        return scan_string(p, end, out);
    case '{':
        type = J_OBJ;
        p = skip_ws(p + 1, end);
        if (p < end && *p == '}') {
            after = p + 1;
            break;
        }
        for (;;) {
            if (p >= end || *p != '"') return NULL;
            p = scan_string(p, end, NULL);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end || *p != ':') return NULL;
            p = skip_ws(p + 1, end);
            p = scan_value(p, end, depth + 1, NULL);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end) return NULL;
            if (*p == '}') break;
            if (*p != ',') return NULL;
            p = skip_ws(p + 1, end);
        }
        after = p + 1;
        break;
    case '[':
        type = J_ARR;
        p = skip_ws(p + 1, end);
        if (p < end && *p == ']') {
            after = p + 1;
            break;
        }
        for (;;) {
            p = scan_value(p, end, depth + 1, NULL);
            if (!p) return NULL;
            p = skip_ws(p, end);
            if (p >= end) return NULL;
            if (*p == ']') break;
            if (*p != ',') return NULL;
            p = skip_ws(p + 1, end);
        }
        after = p + 1;
        break;
    case 't':
        type = J_TRUE;
        after = scan_literal(p, end, "true");
        break;
    case 'f':
        type = J_FALSE;
        after = scan_literal(p, end, "false");
        break;
    case 'n':
        type = J_NULL;
        after = scan_literal(p, end, "null");
        break;
    default:
        type = J_NUM;
        after = scan_number(p, end);
        break;
    }
    if (!after) return NULL;
    if (out) {
        out->s = start;
        out->e = after;
        out->type = type;
        out->escaped = 0;
    }
    return after;
}

/* Strict UTF-8 (no overlongs, no surrogates, nothing past U+10FFFF), as Python's decoder. */
static int valid_utf8(const uchar *p, const uchar *end) {
    while (p < end) {
        uchar c = *p;
        if (c < 0x80) {
            p++;
            continue;
        }
        size_t n;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) {
            n = 1;
            cp = c & 0x1F;
        } else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            cp = c & 0x0F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            cp = c & 0x07;
        } else {
            return 0;
        }
        if ((size_t)(end - p) <= n) return 0;
        for (size_t i = 1; i <= n; i++) {
            if ((p[i] & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (p[i] & 0x3F);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        p += n + 1;
    }
    return 1;
}

/* Reading the fields of an already validated object: names are matched exactly (a key with an escape,
 * or a listed name met twice, defers the line). */
typedef struct {
    const char *name;
    size_t len;
} Name;

#define NAME(s) {s, sizeof(s) - 1}

/* A length index over a long name list: by_len[n] lists the names of length n (-1 ends a list). */
#define INDEX_LENGTHS 64
#define INDEX_WIDTH 8
typedef struct {
    signed char by_len[INDEX_LENGTHS][INDEX_WIDTH];
} NameIndex;

static void index_build(NameIndex *ix, const Name *names, int count) {
    memset(ix->by_len, -1, sizeof ix->by_len);
    for (int i = 0; i < count; i++) {
        signed char *slot = ix->by_len[names[i].len];
        while (*slot >= 0) slot++; /* the name lists are fixed: every length fits INDEX_WIDTH - 1 */
        *slot = (signed char)i;
    }
}

/* Walk the object that starts at p ('{'), filling out[i] with the member named names[i] (J_NONE when
 * absent); *after is the byte after the object. Keys are matched exactly: a key with an escape (it might
 * spell a listed name) or a listed name met twice defers. Every member value is validated on the way.
 * -1: defer. */
static int walk_object(const uchar *p, const uchar *end, int depth, const Name *names, int count,
                       const NameIndex *ix, Val *out, const uchar **after) {
    for (int i = 0; i < count; i++) out[i].type = J_NONE;
    if (p >= end || *p != '{' || depth > MAX_DEPTH) return -1;
    p = skip_ws(p + 1, end);
    if (p < end && *p == '}') {
        *after = p + 1;
        return 0;
    }
    for (;;) {
        Val key, value;
        if (p >= end || *p != '"') return -1;
        p = scan_string(p, end, &key);
        if (!p || key.escaped) return -1;
        p = skip_ws(p, end);
        if (p >= end || *p != ':') return -1;
        p = skip_ws(p + 1, end);
        p = scan_value(p, end, depth + 1, &value);
        if (!p) return -1;
        size_t klen = (size_t)(key.e - key.s);
        if (ix) {
            if (klen < INDEX_LENGTHS)
                for (const signed char *slot = ix->by_len[klen]; *slot >= 0; slot++)
                    if (memcmp(names[*slot].name, key.s, klen) == 0) {
                        if (out[*slot].type != J_NONE) return -1;
                        out[*slot] = value;
                        break;
                    }
        } else {
            for (int i = 0; i < count; i++)
                if (names[i].len == klen && memcmp(names[i].name, key.s, klen) == 0) {
                    if (out[i].type != J_NONE) return -1;
                    out[i] = value;
                    break;
                }
        }
        p = skip_ws(p, end);
        if (p >= end) return -1;
        if (*p == '}') {
            *after = p + 1;
            return 0;
        }
        if (*p != ',') return -1;
        p = skip_ws(p + 1, end);
    }
}

/* the members of an already read object value */
static int get_fields(const Val *obj, const Name *names, int count, Val *out) {
    const uchar *after;
    if (obj->type != J_OBJ) {
        for (int i = 0; i < count; i++) out[i].type = J_NONE;
        return -1;
    }
    return walk_object(obj->s, obj->e, 0, names, count, NULL, out, &after);
}

/* Next element of an array being walked; 1: got one, 0: end, -1: defer. */
static int array_next(const uchar **cursor, const uchar *end, Val *out) {
    const uchar *p = skip_ws(*cursor, end);
    if (p >= end) return -1;
    if (*p == ']') return 0;
    if (*p == ',') p = skip_ws(p + 1, end);
    p = scan_value(p, end, 0, out);
    if (!p) return -1;
    *cursor = p;
    return 1;
}

static const uchar *array_begin(const Val *arr) { return arr->s + 1; }

/* A msgspec field typed `str | None`: absent and null read as absent; a string must not need decoding
 * when `needed`. -1: defer. */
static int opt_str(const Val *v, int needed) {
    if (v->type == J_NONE) return 0;
    if (v->type == J_NULL) {
        ((Val *)v)->type = J_NONE;
        return 0;
    }
    if (v->type != J_STR) return -1;
    if (needed && v->escaped) return -1;
    return 0;
}

static int present(const Val *v) { return v->type != J_NONE; }

/* ------------------------------------------------------------------------------------------------ */
/* the scanner                                                                                       */

enum {
    T_PATIENT, T_ENCOUNTER, T_CONDITION, T_PROCEDURE, T_MED_REQUEST, T_MED_ADMINISTRATION, T_MED_DISPENSE,
    T_MEDICATION, T_OBSERVATION, T_COUNT
};

static const Name TYPE_NAMES[T_COUNT] = {
    NAME("Patient"), NAME("Encounter"), NAME("Condition"), NAME("Procedure"), NAME("MedicationRequest"),
    NAME("MedicationAdministration"), NAME("MedicationDispense"), NAME("Medication"), NAME("Observation"),
};

/* the row columns, in ROW_SCHEMA order */
enum {
    R_SUBJECT, R_TIME, R_TIME_FIELD, R_BIRTH, R_CODE, R_VALUE, R_TEXT, R_ENCOUNTER, R_UNIT, R_COMPARATOR,
    R_EVENT_TYPE, R_ISSUED, R_MED_KEY, R_FROM_ENCOUNTER, R_RTYPE, R_LINE, R_ENTRY, R_TIME_US, R_ISSUED_US, R_COUNT
};
static const int ROW_KINDS[R_COUNT] = {
    COL_I64, COL_STR, COL_STR, COL_BOOL, COL_STR, COL_F32, COL_STR, COL_I64, COL_STR, COL_STR,
    COL_STR, COL_STR, COL_STR, COL_BOOL, COL_STR, COL_I64, COL_I32, COL_I64, COL_I64,
};
static const int ROW_LARGE[R_COUNT] = {[R_TEXT] = 1}; /* text_value is a large_string */

enum { K_RTYPE, K_ID, K_DIGEST, K_LINE, K_ENTRY, K_COUNT };
static const int KEY_KINDS[K_COUNT] = {COL_STR, COL_STR, COL_I64, COL_I64, COL_I32};
enum { P_SUBJECT, P_ID, P_LINE, P_ENTRY, P_COUNT };
static const int PATIENT_KINDS[P_COUNT] = {COL_I64, COL_STR, COL_I64, COL_I32};
enum { M_KEY, M_CODE, M_LINE, M_ENTRY, M_COUNT };
static const int MED_KINDS[M_COUNT] = {COL_STR, COL_STR, COL_I64, COL_I32};

typedef struct {
    PyObject_HEAD
    PyObject *systems;      /* dict: system URI -> vocabulary */
    PyObject *code_cache;   /* dict: (system, code) -> event code (Context.code_cache) */
    PyObject *descriptions; /* dict: event code -> description (Context.descriptions) */
    uint64_t sample_every;  /* 0: no line is sampled for validation */
    Column rows[R_COUNT], keys[K_COUNT], patients[P_COUNT], meds[M_COUNT];
    Map ids;       /* "Type/id" text -> stable id */
    Map codes;     /* first coding (system, code) -> event code, for pairs in code_cache */
    Map described; /* ENCOUNTER_START codes known to have a description */
    int64_t counts[T_COUNT];
    int order[T_COUNT], ordered; /* types in order of first count since the last drain */
    Buf scratch;
    Buf code_copy; /* an event code not kept in the cache (lives until the next line) */
} Scanner;

typedef struct {
    const char *p;
    size_t n;
} Str;

static const Str NONE_STR = {NULL, 0};

static Str val_str(const Val *v) {
    if (v->type != J_STR) return NONE_STR;
    Str s = {(const char *)v->s, (size_t)(v->e - v->s)};
    return s;
}

static Str cstr(const char *p) {
    Str s = {p, strlen(p)};
    return s;
}

/* Python `a or b` for two optional strings. */
static Str str_or(Str a, Str b) { return a.p && a.n ? a : b; }

static int64_t cached_id(Scanner *sc, const char *prefix, size_t np, const char *id, size_t nid, int *error) {
    /* key = prefix + id, hashed whole */
    sc->scratch.len = 0;
    if (buf_append(&sc->scratch, prefix, np) < 0 || buf_append(&sc->scratch, id, nid) < 0) {
        *error = 1;
        return 0;
    }
    const uchar *key = (const uchar *)sc->scratch.data;
    size_t n = sc->scratch.len;
    uint64_t h = hash_bytes(key, n);
    Slot *s = map_find(&sc->ids, key, n, h);
    if (s && s->used) return s->value;
    int64_t value = stable_id2(prefix, np, id, nid);
    if (!map_put(&sc->ids, key, n, h, value, NULL, 0)) *error = 1;
    return value;
}

/* A literal `Type/id` reference (prefix "Type/", no further slash, non-empty id) -> its stable id. */
static int literal_ref(Scanner *sc, Str text, const char *prefix, int64_t *id) {
    size_t np = strlen(prefix);
    if (!text.p || text.n <= np || memcmp(text.p, prefix, np) != 0) return 0;
    if (memchr(text.p + np, '/', text.n - np)) return 0;
    int error = 0;
    *id = cached_id(sc, prefix, np, text.p + np, text.n - np, &error);
    return error ? -1 : 1;
}

static PyObject *py_str(Str s) {
    if (!s.p) return Py_NewRef(Py_None);
    return PyUnicode_DecodeUTF8(s.p, (Py_ssize_t)s.n, "strict");
}

/* Python truthiness of an optional str object. */
static int truthy(PyObject *o) { return o != Py_None && PyUnicode_GET_LENGTH(o) > 0; }

enum { CODE_FOUND = 1, CODE_NONE = 0, CODE_DEFER = -1, CODE_ERROR = -2 };

static const Name CONCEPT_FIELDS[] = {NAME("coding"), NAME("text")};
static const Name CODING_FIELDS[] = {NAME("system"), NAME("code"), NAME("display")};

/* fhir_fast.FastFlattener._code: the concept's event code (written into *code, valid until the next
 * call), CODE_NONE where the fast path returns None, CODE_DEFER where msgspec would refuse the shape. */
static int concept_code(Scanner *sc, const Val *concept, Str *code) {
    Val cf[2];
    if (get_fields(concept, CONCEPT_FIELDS, 2, cf) < 0) return CODE_DEFER;
    if (opt_str(&cf[1], 1) < 0) return CODE_DEFER;
    if (cf[0].type == J_NULL) cf[0].type = J_NONE;
    if (cf[0].type == J_NONE) return CODE_NONE;
    if (cf[0].type != J_ARR) return CODE_DEFER;
    /* check every coding's shape first (msgspec checks the whole list before any side effect) */
    Val first[3];
    int codings = 0;
    const uchar *cursor = array_begin(&cf[0]);
    for (;;) {
        Val item, f[3];
        int got = array_next(&cursor, cf[0].e, &item);
        if (got < 0) return CODE_DEFER;
        if (!got) break;
        if (get_fields(&item, CODING_FIELDS, 3, f) < 0) return CODE_DEFER;
        for (int i = 0; i < 3; i++)
            if (opt_str(&f[i], 1) < 0) return CODE_DEFER;
        if (!codings) memcpy(first, f, sizeof first);
        codings++;
    }
    if (!codings) return CODE_NONE;
    /* the per-scanner cache of pairs known to be in code_cache */
    Str fs = val_str(&first[0]), fc = val_str(&first[1]);
    sc->scratch.len = 0;
    uchar tag[2] = {fs.p != NULL, fc.p != NULL};
    uint32_t ns = (uint32_t)fs.n;
    if (fs.n > UINT32_MAX || buf_append(&sc->scratch, tag, 2) < 0 || buf_append(&sc->scratch, &ns, 4) < 0 ||
        buf_append(&sc->scratch, fs.p ? fs.p : "", fs.n) < 0 || buf_append(&sc->scratch, fc.p ? fc.p : "", fc.n) < 0)
        return CODE_ERROR;
    uint64_t h = hash_bytes((const uchar *)sc->scratch.data, sc->scratch.len);
    Slot *slot = map_find(&sc->codes, (const uchar *)sc->scratch.data, sc->scratch.len, h);
    if (slot && slot->used) {
        code->p = sc->codes.arena.data + slot->value;
        code->n = slot->value_len;
        return CODE_FOUND;
    }
    /* a miss: run the Python path's logic on the shared dicts */
    int result = CODE_NONE;
    PyObject *key = NULL, *found = NULL, *text = NULL;
    PyObject *sys_obj = py_str(fs), *code_obj = py_str(fc);
    key = sys_obj && code_obj ? PyTuple_Pack(2, sys_obj, code_obj) : NULL;
    Py_XDECREF(sys_obj);
    Py_XDECREF(code_obj);
    if (!key) return CODE_ERROR;
    found = PyDict_GetItemWithError(sc->code_cache, key); /* borrowed */
    if (!found && PyErr_Occurred()) goto error;
    if (found) {
        if (!PyUnicode_Check(found)) {
            Py_DECREF(key);
            return CODE_DEFER;
        }
        Py_INCREF(found);
        goto remember;
    }
    text = py_str(val_str(&cf[1]));
    if (!text) goto error;
    cursor = array_begin(&cf[0]);
    for (int index = 0;; index++) {
        Val item, f[3];
        int got = array_next(&cursor, cf[0].e, &item);
        if (got <= 0) break;
        if (get_fields(&item, CODING_FIELDS, 3, f) < 0) break;
        for (int i = 0; i < 3; i++) opt_str(&f[i], 1);
        Str system = val_str(&f[0]), value = val_str(&f[1]);
        if (!system.p || !value.p || !value.n) continue;
        PyObject *system_obj = py_str(system);
        if (!system_obj) goto error;
        PyObject *vocab = PyDict_GetItemWithError(sc->systems, system_obj); /* borrowed */
        if (!vocab) {
            Py_DECREF(system_obj);
            if (PyErr_Occurred()) goto error;
            continue;
        }
        if (!PyUnicode_Check(vocab)) { /* the Python path would format it with str(); not ours to guess */
            Py_DECREF(system_obj);
            Py_DECREF(text);
            Py_DECREF(key);
            return CODE_DEFER;
        }
        PyObject *value_obj = py_str(value);
        found = value_obj ? PyUnicode_FromFormat("%U//%U", vocab, value_obj) : NULL;
        if (!found) {
            Py_DECREF(system_obj);
            Py_XDECREF(value_obj);
            goto error;
        }
        int known = PyDict_Contains(sc->descriptions, found);
        if (known < 0) {
            Py_DECREF(system_obj);
            Py_DECREF(value_obj);
            goto error;
        }
        if (!known) {
            PyObject *display = py_str(val_str(&f[2]));
            if (!display) {
                Py_DECREF(system_obj);
                Py_DECREF(value_obj);
                goto error;
            }
            PyObject *chosen = truthy(display) ? display : text;
            int failed = truthy(chosen) && PyDict_SetItem(sc->descriptions, found, chosen) < 0;
            Py_DECREF(display);
            if (failed) {
                Py_DECREF(system_obj);
                Py_DECREF(value_obj);
                goto error;
            }
        }
        int cached = 0;
        if (index == 0 && PyDict_GET_SIZE(sc->code_cache) < PY_CODE_CACHE_LIMIT) {
            PyObject *pair = PyTuple_Pack(2, system_obj, value_obj);
            if (!pair || PyDict_SetItem(sc->code_cache, pair, found) < 0) {
                Py_XDECREF(pair);
                Py_DECREF(system_obj);
                Py_DECREF(value_obj);
                goto error;
            }
            Py_DECREF(pair);
            cached = 1;
        }
        Py_DECREF(system_obj);
        Py_DECREF(value_obj);
        if (cached) goto remember;
        goto copy_out;
    }
    Py_DECREF(text);
    Py_DECREF(key);
    return CODE_NONE;

remember: /* `found` (a new reference) is in code_cache under `key`: keep it in the per-scanner cache too */
    {
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(found, &n);
        if (!utf8) goto error;
        /* the scratch buffer still holds this pair's cache key */
        slot = map_put(&sc->codes, (const uchar *)sc->scratch.data, sc->scratch.len, h, 0, utf8, (size_t)n);
        if (!slot) goto error;
        code->p = sc->codes.arena.data + slot->value;
        code->n = slot->value_len;
        result = CODE_FOUND;
        goto done;
    }
copy_out: /* an uncached code: a copy that outlives the scratch buffer's next use */
    {
        Py_ssize_t n;
        const char *utf8 = PyUnicode_AsUTF8AndSize(found, &n);
        if (!utf8) goto error;
        sc->code_copy.len = 0;
        if (buf_append(&sc->code_copy, utf8, (size_t)n) < 0) goto error;
        code->p = sc->code_copy.data;
        code->n = (size_t)n;
        result = CODE_FOUND;
        goto done;
    }
error:
    result = CODE_ERROR;
done:
    Py_XDECREF(found);
    Py_XDECREF(text);
    Py_DECREF(key);
    if (result == CODE_ERROR && !PyErr_Occurred()) PyErr_NoMemory();
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* one resource                                                                                      */

enum {
    F_RESOURCE_TYPE, F_ID, F_SUBJECT, F_PATIENT, F_ENCOUNTER, F_CONTEXT, F_BIRTH_DATE, F_DECEASED, F_GENDER,
    F_PERIOD, F_CLASS, F_HOSPITALIZATION, F_ADMISSION, F_CODE, F_RECORDED_DATE, F_ONSET_DATETIME,
    F_ONSET_PERIOD, F_PERFORMED_DATETIME, F_PERFORMED_PERIOD, F_OCCURRENCE_DATETIME, F_OCCURRENCE_PERIOD,
    F_MED_CONCEPT, F_MED_REFERENCE, F_MEDICATION, F_AUTHORED_ON, F_EFFECTIVE_DATETIME, F_EFFECTIVE_PERIOD,
    F_OCCURENCE_DATETIME, F_WHEN_HANDED_OVER, F_WHEN_PREPARED, F_CATEGORY, F_EFFECTIVE_INSTANT, F_ISSUED,
    F_COMPONENT, F_VALUE_QUANTITY, F_VALUE_STRING, F_VALUE_INTEGER, F_VALUE_DECIMAL, F_VALUE_CONCEPT,
    F_VALUE_BOOLEAN, F_COUNT
};

static const Name TOP_FIELDS[F_COUNT] = {
    NAME("resourceType"), NAME("id"), NAME("subject"), NAME("patient"), NAME("encounter"), NAME("context"),
    NAME("birthDate"), NAME("deceasedDateTime"), NAME("gender"), NAME("period"), NAME("class"),
    NAME("hospitalization"), NAME("admission"), NAME("code"), NAME("recordedDate"), NAME("onsetDateTime"),
    NAME("onsetPeriod"), NAME("performedDateTime"), NAME("performedPeriod"), NAME("occurrenceDateTime"),
    NAME("occurrencePeriod"), NAME("medicationCodeableConcept"), NAME("medicationReference"), NAME("medication"),
    NAME("authoredOn"), NAME("effectiveDateTime"), NAME("effectivePeriod"), NAME("occurenceDateTime"),
    NAME("whenHandedOver"), NAME("whenPrepared"), NAME("category"), NAME("effectiveInstant"), NAME("issued"),
    NAME("component"), NAME("valueQuantity"), NAME("valueString"), NAME("valueInteger"), NAME("valueDecimal"),
    NAME("valueCodeableConcept"), NAME("valueBoolean"),
};

enum { DEFER = 0, EMITTED = 1, FAILED = -1 };

typedef struct {
    Str time, time_field, code, text, unit, comparator, event_type, issued, med_key, rtype;
    int64_t subject, encounter;
    int has_encounter, birth, from_encounter, has_value;
    float value;
} Row;

/* Times of the one form exports almost always use, `YYYY-MM-DDThh:mm:ss` then `Z` or `+hh:mm`, read
 * here as microseconds since the epoch in UTC (what fhir_times gives them, through Arrow's parser).
 * Any other form, or a value out of the plain ranges (a leap second, day 31 of a short month, an offset
 * beyond 18 hours), is left null for fhir_times to read (and to reject where it must). */
static int two_digits(const uchar *p, int *out) {
    if (p[0] < '0' || p[0] > '9' || p[1] < '0' || p[1] > '9') return 0;
    *out = (p[0] - '0') * 10 + (p[1] - '0');
    return 1;
}

static int64_t days_from_civil(int64_t y, int m, int d) { /* proleptic Gregorian, 1970-01-01 = 0 */
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

static int instant_us(Str s, int64_t *us) {
    const uchar *p = (const uchar *)s.p;
    if (!p || (s.n != 20 && s.n != 25)) return 0;
    int c1, c2, mo, d, h, mi, se;
    if (!two_digits(p, &c1) || !two_digits(p + 2, &c2) || p[4] != '-' || !two_digits(p + 5, &mo) || p[7] != '-' ||
        !two_digits(p + 8, &d) || p[10] != 'T' || !two_digits(p + 11, &h) || p[13] != ':' ||
        !two_digits(p + 14, &mi) || p[16] != ':' || !two_digits(p + 17, &se))
        return 0;
    int year = c1 * 100 + c2;
    static const int month_days[12] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (year < 1 || mo < 1 || mo > 12 || d < 1 || d > month_days[mo - 1] || h > 23 || mi > 59 || se > 59) return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (mo == 2 && d == 29 && !leap) return 0;
    int64_t offset = 0;
    if (s.n == 20) {
        if (p[19] != 'Z') return 0;
    } else {
        int oh, om;
        if ((p[19] != '+' && p[19] != '-') || !two_digits(p + 20, &oh) || p[22] != ':' || !two_digits(p + 23, &om) ||
            oh > 18 || om > 59)
            return 0;
        offset = (p[19] == '-' ? -1 : 1) * (int64_t)(oh * 3600 + om * 60);
    }
    int64_t seconds = days_from_civil(year, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset;
    *us = seconds * 1000000;
    return 1;
}

static int col_instant(Column *c, Str s) {
    int64_t us;
    return instant_us(s, &us) ? col_i64(c, us) : col_null(c);
}

static int emit_row(Scanner *sc, const Row *r, int64_t line) {
    Column *c = sc->rows;
    if (col_i64(&c[R_SUBJECT], r->subject) < 0 || col_str(&c[R_TIME], r->time.p, r->time.n) < 0 ||
        col_str(&c[R_TIME_FIELD], r->time_field.p, r->time_field.n) < 0 || col_bool(&c[R_BIRTH], r->birth) < 0 ||
        col_str(&c[R_CODE], r->code.p, r->code.n) < 0 ||
        (r->has_value ? col_f32(&c[R_VALUE], r->value) : col_null(&c[R_VALUE])) < 0 ||
        col_str(&c[R_TEXT], r->text.p, r->text.n) < 0 ||
        (r->has_encounter ? col_i64(&c[R_ENCOUNTER], r->encounter) : col_null(&c[R_ENCOUNTER])) < 0 ||
        col_str(&c[R_UNIT], r->unit.p, r->unit.n) < 0 || col_str(&c[R_COMPARATOR], r->comparator.p, r->comparator.n) < 0 ||
        col_str(&c[R_EVENT_TYPE], r->event_type.p, r->event_type.n) < 0 ||
        col_str(&c[R_ISSUED], r->issued.p, r->issued.n) < 0 || col_str(&c[R_MED_KEY], r->med_key.p, r->med_key.n) < 0 ||
        col_bool(&c[R_FROM_ENCOUNTER], r->from_encounter) < 0 || col_str(&c[R_RTYPE], r->rtype.p, r->rtype.n) < 0 ||
        col_i64(&c[R_LINE], line) < 0 || col_i32(&c[R_ENTRY], 0) < 0 || col_instant(&c[R_TIME_US], r->time) < 0 ||
        col_instant(&c[R_ISSUED_US], r->issued) < 0)
        return -1;
    return 0;
}

static Row new_row(int64_t subject, int type) {
    Row r;
    memset(&r, 0, sizeof r);
    r.subject = subject;
    r.rtype.p = TYPE_NAMES[type].name;
    r.rtype.n = TYPE_NAMES[type].len;
    return r;
}

static const Name REFERENCE_FIELDS[] = {NAME("reference")};
static const Name PERIOD_FIELDS[] = {NAME("start"), NAME("end")};

/* msgspec `Reference | None`: *text is the reference string or NONE_STR. -1: defer. */
static int reference_of(const Val *v, Str *text) {
    *text = NONE_STR;
    if (v->type == J_NONE || v->type == J_NULL) return 0;
    Val f[1];
    if (get_fields(v, REFERENCE_FIELDS, 1, f) < 0 || opt_str(&f[0], 1) < 0) return -1;
    *text = val_str(&f[0]);
    return 0;
}

/* msgspec `Period | None`: *is_present tells None apart. -1: defer. */
static int period_of(const Val *v, int *is_present, Str *start, Str *end) {
    *is_present = 0;
    *start = *end = NONE_STR;
    if (v->type == J_NONE || v->type == J_NULL) return 0;
    Val f[2];
    if (get_fields(v, PERIOD_FIELDS, 2, f) < 0 || opt_str(&f[0], 1) < 0 || opt_str(&f[1], 1) < 0) return -1;
    *is_present = 1;
    *start = val_str(&f[0]);
    *end = val_str(&f[1]);
    return 0;
}

/* a concept field's shape, checked even where it is not read (msgspec checks every field) */
static int concept_shape(const Val *v) {
    if (v->type == J_NONE || v->type == J_NULL) return 0;
    Val cf[2];
    if (get_fields(v, CONCEPT_FIELDS, 2, cf) < 0 || opt_str(&cf[1], 0) < 0) return -1;
    if (cf[0].type == J_NONE || cf[0].type == J_NULL) return 0;
    if (cf[0].type != J_ARR) return -1;
    const uchar *cursor = array_begin(&cf[0]);
    for (;;) {
        Val item, f[3];
        int got = array_next(&cursor, cf[0].e, &item);
        if (got < 0) return -1;
        if (!got) return 0;
        if (get_fields(&item, CODING_FIELDS, 3, f) < 0) return -1;
        for (int i = 0; i < 3; i++)
            if (opt_str(&f[i], 0) < 0) return -1;
    }
}

/* the subject of _SubjectResource: a literal Patient reference, else defer */
static int subject_of(Scanner *sc, const Val *f, int64_t *sid) {
    Str text;
    if (reference_of(&f[F_SUBJECT], &text) < 0) return -1;
    int got = literal_ref(sc, text, "Patient/", sid);
    return got == 1 ? 0 : got < 0 ? -2 : -1;
}

/* FastFlattener._encounter_ref: 0 with *has set, -1 defer, -2 error */
static int encounter_of(Scanner *sc, const Val *f, int64_t *eid, int *has) {
    *has = 0;
    Str text;
    if (reference_of(&f[F_ENCOUNTER], &text) < 0) return -1;
    if (f[F_ENCOUNTER].type == J_NONE || f[F_ENCOUNTER].type == J_NULL)
        return present(&f[F_CONTEXT]) ? -1 : 0;
    int got = literal_ref(sc, text, "Encounter/", eid);
    if (got < 0) return -2;
    if (!got) return -1;
    *has = 1;
    return 0;
}

#define CHECK(expr)                     \
    do {                                \
        int _r = (expr);                \
        if (_r == -2) return FAILED;    \
        if (_r < 0) return DEFER;       \
    } while (0)

/* the code of a concept field into *code (-1 defer, -2 error). It checks the whole concept's shape
 * before any side effect, so callers need no separate shape check of a field they pass here. */
static int code_field(Scanner *sc, const Val *v, Str *code) {
    if (v->type == J_NONE || v->type == J_NULL) return -1;
    int got = concept_code(sc, v, code);
    if (got == CODE_ERROR) return -2;
    return got == CODE_FOUND ? 0 : -1;
}

static int flatten_patient(Scanner *sc, const Val *f, Str rid, int64_t line) {
    CHECK(opt_str(&f[F_BIRTH_DATE], 1));
    CHECK(opt_str(&f[F_DECEASED], 1));
    CHECK(opt_str(&f[F_GENDER], 1));
    Str birth = val_str(&f[F_BIRTH_DATE]), deceased = val_str(&f[F_DECEASED]), gender = val_str(&f[F_GENDER]);
    if (gender.p && !gender.n) return DEFER;
    int64_t sid = stable_id2("Patient/", 8, rid.p, rid.n); /* a resource's own id: rarely met again */
    if (birth.p) {
        Row r = new_row(sid, T_PATIENT);
        r.time = birth;
        r.time_field = cstr("Patient.birthDate");
        r.birth = 1;
        r.code = cstr("MEDS_BIRTH");
        r.event_type = cstr("birth");
        if (emit_row(sc, &r, line) < 0) return FAILED;
    }
    if (deceased.p) {
        Row r = new_row(sid, T_PATIENT);
        r.time = deceased;
        r.time_field = cstr("Patient.deceasedDateTime");
        r.code = cstr("MEDS_DEATH");
        r.event_type = cstr("death");
        if (emit_row(sc, &r, line) < 0) return FAILED;
    }
    if (gender.p) {
        sc->scratch.len = 0;
        if (buf_append(&sc->scratch, "GENDER//", 8) < 0 || buf_append(&sc->scratch, gender.p, gender.n) < 0)
            return FAILED;
        Row r = new_row(sid, T_PATIENT);
        r.code.p = sc->scratch.data;
        r.code.n = sc->scratch.len;
        r.event_type = cstr("demographic");
        if (emit_row(sc, &r, line) < 0) return FAILED;
    }
    Column *p = sc->patients;
    if (col_i64(&p[P_SUBJECT], sid) < 0 || col_str(&p[P_ID], rid.p, rid.n) < 0 || col_i64(&p[P_LINE], line) < 0 ||
        col_i32(&p[P_ENTRY], 0) < 0)
        return FAILED;
    return EMITTED;
}

static const Name HOSPITALIZATION_FIELDS[] = {NAME("dischargeDisposition")};

/* the shapes of subject and encounter, for an Encounter (which reads only its subject); the other
 * types read both through subject_of and encounter_of before they emit anything */
static int subject_resource_shape(const Val *f) {
    Str ignored;
    if (reference_of(&f[F_SUBJECT], &ignored) < 0 || reference_of(&f[F_ENCOUNTER], &ignored) < 0) return -1;
    return 0;
}

static int encounter_description(Scanner *sc, Str code_start, Str display) {
    uint64_t h = hash_bytes((const uchar *)code_start.p, code_start.n);
    Slot *s = map_find(&sc->described, (const uchar *)code_start.p, code_start.n, h);
    if (s && s->used) return 0;
    PyObject *key = py_str(code_start);
    if (!key) return -1;
    int known = PyDict_Contains(sc->descriptions, key);
    if (known < 0) {
        Py_DECREF(key);
        return -1;
    }
    if (!known) {
        PyObject *tail = py_str(display);
        PyObject *joined = tail ? PyUnicode_FromFormat("start of %U", tail) : NULL;
        int failed = !joined || PyDict_SetItem(sc->descriptions, key, joined) < 0;
        Py_XDECREF(tail);
        Py_XDECREF(joined);
        if (failed) {
            Py_DECREF(key);
            return -1;
        }
    }
    Py_DECREF(key);
    return map_put(&sc->described, (const uchar *)code_start.p, code_start.n, h, 1, NULL, 0) ? 0 : -1;
}

static int flatten_encounter(Scanner *sc, const Val *f, Str rid, int64_t line) {
    CHECK(subject_resource_shape(f));
    int has_period;
    Str start, end;
    CHECK(period_of(&f[F_PERIOD], &has_period, &start, &end));
    Val klass[3], hosp[1];
    int has_class = present(&f[F_CLASS]) && f[F_CLASS].type != J_NULL;
    if (has_class) {
        CHECK(get_fields(&f[F_CLASS], CODING_FIELDS, 3, klass));
        for (int i = 0; i < 3; i++) CHECK(opt_str(&klass[i], 1));
    }
    Str disposition = NONE_STR;
    if (present(&f[F_HOSPITALIZATION]) && f[F_HOSPITALIZATION].type != J_NULL) {
        CHECK(get_fields(&f[F_HOSPITALIZATION], HOSPITALIZATION_FIELDS, 1, hosp));
        CHECK(concept_shape(&hosp[0]));
        if (present(&hosp[0]) && hosp[0].type != J_NULL) {
            Val cf[2];
            CHECK(get_fields(&hosp[0], CONCEPT_FIELDS, 2, cf));
            CHECK(opt_str(&cf[1], 1));
            Str first_code = NONE_STR;
            if (cf[0].type == J_ARR) {
                const uchar *cursor = array_begin(&cf[0]);
                Val item, cd[3];
                int got = array_next(&cursor, cf[0].e, &item);
                CHECK(got < 0 ? -1 : 0);
                if (got) {
                    CHECK(get_fields(&item, CODING_FIELDS, 3, cd));
                    CHECK(opt_str(&cd[1], 1));
                    first_code = val_str(&cd[1]);
                }
            }
            disposition = str_or(first_code, val_str(&cf[1]));
        }
    }
    if (!has_period || !start.p || !has_class) return DEFER;
    Str class_code = val_str(&klass[1]);
    if (!class_code.p || !class_code.n || present(&f[F_ADMISSION])) return DEFER;
    int64_t sid;
    CHECK(subject_of(sc, f, &sid));
    int64_t eid = stable_id2("Encounter/", 10, rid.p, rid.n); /* not cached, as in fhir_fast */
    sc->scratch.len = 0;
    if (buf_append(&sc->scratch, "ENCOUNTER_START//", 17) < 0 || buf_append(&sc->scratch, class_code.p, class_code.n) < 0)
        return FAILED;
    Str code_start = {sc->scratch.data, sc->scratch.len};
    Str display = val_str(&klass[2]);
    if (display.p && encounter_description(sc, code_start, display) < 0) return FAILED;
    Row r = new_row(sid, T_ENCOUNTER);
    r.time = start;
    r.time_field = cstr("Encounter.period.start");
    r.code = code_start;
    r.text = disposition;
    r.encounter = eid;
    r.has_encounter = 1;
    r.event_type = cstr("encounter_start");
    r.issued = end;
    return emit_row(sc, &r, line) < 0 ? FAILED : EMITTED;
}

/* FastFlattener._timed_event */
static int timed_event(Scanner *sc, const Val *f, int type, const char *event_type, Str code, Str time,
                       const char *field, Str issued, int64_t line) {
    int64_t sid, eid = 0;
    int has;
    CHECK(subject_of(sc, f, &sid));
    CHECK(encounter_of(sc, f, &eid, &has));
    if (!time.p && !has) return DEFER;
    Row r = new_row(sid, type);
    r.time = time;
    r.time_field = time.p ? cstr(field) : NONE_STR;
    r.code = code;
    r.encounter = eid;
    r.has_encounter = has;
    r.event_type = cstr(event_type);
    r.issued = issued;
    r.from_encounter = !time.p;
    return emit_row(sc, &r, line) < 0 ? FAILED : EMITTED;
}

static int flatten_condition(Scanner *sc, const Val *f, int64_t line) {
    CHECK(opt_str(&f[F_RECORDED_DATE], 1));
    CHECK(opt_str(&f[F_ONSET_DATETIME], 1));
    int has_period;
    Str start, end;
    CHECK(period_of(&f[F_ONSET_PERIOD], &has_period, &start, &end));
    Str code;
    CHECK(code_field(sc, &f[F_CODE], &code));
    Str time = NONE_STR;
    const char *field = NULL;
    if (f[F_ONSET_DATETIME].type == J_STR) {
        time = val_str(&f[F_ONSET_DATETIME]);
        field = "Condition.onsetDateTime";
    } else if (has_period) {
        if (!start.p) return DEFER;
        time = start;
        field = "Condition.onsetPeriod.start";
    }
    return timed_event(sc, f, T_CONDITION, "condition", code, time, field, val_str(&f[F_RECORDED_DATE]), line);
}

static int flatten_procedure(Scanner *sc, const Val *f, int64_t line) {
    CHECK(opt_str(&f[F_PERFORMED_DATETIME], 1));
    int has_period;
    Str start, end;
    CHECK(period_of(&f[F_PERFORMED_PERIOD], &has_period, &start, &end));
    Str code;
    CHECK(code_field(sc, &f[F_CODE], &code));
    Str time = NONE_STR;
    const char *field = NULL;
    if (f[F_PERFORMED_DATETIME].type == J_STR) {
        time = val_str(&f[F_PERFORMED_DATETIME]);
        field = "Procedure.performedDateTime";
    } else if (has_period) {
        if (!start.p) return DEFER;
        time = start;
        field = "Procedure.performedPeriod.start";
    } else if (present(&f[F_OCCURRENCE_DATETIME]) || present(&f[F_OCCURRENCE_PERIOD])) {
        return DEFER;
    }
    return timed_event(sc, f, T_PROCEDURE, "procedure", code, time, field, NONE_STR, line);
}

static int flatten_medication_use(Scanner *sc, const Val *f, int type, int64_t line) {
    Str med_ref;
    CHECK(reference_of(&f[F_MED_REFERENCE], &med_ref));
    if (present(&f[F_MEDICATION])) return DEFER;
    /* the type's time fields, in fhir_fast's TIME_FIELDS order; a Raw field defers when reached */
    Str time = NONE_STR;
    const char *field = NULL;
    if (type == T_MED_REQUEST) {
        CHECK(opt_str(&f[F_AUTHORED_ON], 1));
        if (f[F_AUTHORED_ON].type == J_STR) {
            time = val_str(&f[F_AUTHORED_ON]);
            field = "MedicationRequest.authoredOn";
        }
    } else if (type == T_MED_ADMINISTRATION) {
        CHECK(opt_str(&f[F_EFFECTIVE_DATETIME], 1));
        int has_period;
        Str start, end;
        CHECK(period_of(&f[F_EFFECTIVE_PERIOD], &has_period, &start, &end));
        if (f[F_EFFECTIVE_DATETIME].type == J_STR) {
            time = val_str(&f[F_EFFECTIVE_DATETIME]);
            field = "MedicationAdministration.effectiveDateTime";
        } else if (has_period) {
            if (!start.p) return DEFER;
            time = start;
            field = "MedicationAdministration.effectivePeriod.start";
        } else if (present(&f[F_OCCURENCE_DATETIME])) {
            return DEFER;
        }
    } else {
        CHECK(opt_str(&f[F_WHEN_HANDED_OVER], 1));
        CHECK(opt_str(&f[F_WHEN_PREPARED], 1));
        if (f[F_WHEN_HANDED_OVER].type == J_STR) {
            time = val_str(&f[F_WHEN_HANDED_OVER]);
            field = "MedicationDispense.whenHandedOver";
        } else if (f[F_WHEN_PREPARED].type == J_STR) {
            time = val_str(&f[F_WHEN_PREPARED]);
            field = "MedicationDispense.whenPrepared";
        }
    }
    if (!time.p) return DEFER;
    int64_t sid, eid = 0;
    int has;
    CHECK(subject_of(sc, f, &sid));
    CHECK(encounter_of(sc, f, &eid, &has));
    Str code = NONE_STR, med_key = NONE_STR;
    if (present(&f[F_MED_CONCEPT]) && f[F_MED_CONCEPT].type != J_NULL) {
        CHECK(code_field(sc, &f[F_MED_CONCEPT], &code));
    } else {
        if (!med_ref.p || med_ref.n <= 11 || memcmp(med_ref.p, "Medication/", 11) != 0 ||
            memchr(med_ref.p + 11, '/', med_ref.n - 11))
            return DEFER;
        med_key = med_ref;
    }
    Row r = new_row(sid, type);
    r.time = time;
    r.time_field = cstr(field);
    r.code = code;
    r.encounter = eid;
    r.has_encounter = has;
    r.event_type = cstr("medication");
    r.med_key = med_key;
    return emit_row(sc, &r, line) < 0 ? FAILED : EMITTED;
}

static int flatten_medication(Scanner *sc, const Val *f, Str rid, int64_t line) {
    Str code;
    CHECK(code_field(sc, &f[F_CODE], &code));
    Column *m = sc->meds;
    if (col_start(&m[M_KEY]) < 0 || buf_append(&m[M_KEY].values, "Medication/", 11) < 0) return FAILED;
    /* the key is "Medication/" + id: written in two pieces, then closed like col_str */
    if (buf_append(&m[M_KEY].values, rid.p, rid.n) < 0) return FAILED;
    int64_t key_end = (int64_t)m[M_KEY].values.len;
    if (buf_append(&m[M_KEY].offsets, &key_end, sizeof key_end) < 0 || col_valid(&m[M_KEY], 1) < 0) return FAILED;
    if (col_str(&m[M_CODE], code.p, code.n) < 0 || col_i64(&m[M_LINE], line) < 0 || col_i32(&m[M_ENTRY], 0) < 0)
        return FAILED;
    return EMITTED;
}

static const Name QUANTITY_FIELDS[] = {NAME("value"), NAME("unit"), NAME("code"), NAME("comparator")};
static const Name CATEGORY_FIELDS[] = {NAME("coding")};
static const Name CATEGORY_CODING_FIELDS[] = {NAME("code")};

/* a JSON number read as msgspec `int | float` then converted to float32 by pyarrow. -1: defer. */
static int number_value(const Val *v, float *out) {
    size_t n = (size_t)(v->e - v->s);
    if (n == 0 || n > MAX_NUMBER_CHARS) return -1;
    char text[MAX_NUMBER_CHARS + 1];
    memcpy(text, v->s, n);
    text[n] = 0;
    if (!memchr(text, '.', n) && !memchr(text, 'e', n) && !memchr(text, 'E', n)) {
        /* an integer: pyarrow converts it to float32 only when exact */
        if (n > 9) return -1;
        long value = strtol(text, NULL, 10);
        if (value > EXACT_FLOAT32_INT || value < -EXACT_FLOAT32_INT) return -1;
        *out = (float)value;
        return 0;
    }
    char *stop = NULL;
    double value = strtod(text, &stop);
    if (stop != text + n || !isfinite(value)) return -1; /* 1e999: the fast path defers */
    *out = (float)value;
    return 0;
}

/* the event type of the first category coding Odyssey knows (fhir_fast._category) */
static int category_type(const Val *v, Str *event_type) {
    *event_type = cstr("observation");
    int decided = 0;
    if (v->type == J_NONE || v->type == J_NULL) return 0;
    if (v->type != J_ARR) return -1;
    const uchar *cursor = array_begin(v);
    for (;;) {
        Val category, cf[1];
        int got = array_next(&cursor, v->e, &category);
        if (got < 0) return -1;
        if (!got) return 0;
        if (get_fields(&category, CATEGORY_FIELDS, 1, cf) < 0) return -1;
        if (cf[0].type == J_NONE || cf[0].type == J_NULL) continue;
        if (cf[0].type != J_ARR) return -1;
        const uchar *inner = array_begin(&cf[0]);
        for (;;) {
            Val coding, code[1];
            int more = array_next(&inner, cf[0].e, &coding);
            if (more < 0) return -1;
            if (!more) break;
            if (get_fields(&coding, CATEGORY_CODING_FIELDS, 1, code) < 0 || opt_str(&code[0], 0) < 0) return -1;
            if (decided || code[0].type != J_STR) continue;
            if (code[0].escaped) return -1;
            Str c = val_str(&code[0]);
            if (c.n == 10 && memcmp(c.p, "laboratory", 10) == 0) {
                *event_type = cstr("lab");
                decided = 1;
            } else if (c.n == 11 && memcmp(c.p, "vital-signs", 11) == 0) {
                *event_type = cstr("vital");
                decided = 1;
            }
        }
    }
}

static int flatten_observation(Scanner *sc, const Val *f, int64_t line) {
    Str event_type;
    CHECK(category_type(&f[F_CATEGORY], &event_type));
    CHECK(opt_str(&f[F_EFFECTIVE_DATETIME], 1));
    CHECK(opt_str(&f[F_EFFECTIVE_INSTANT], 1));
    CHECK(opt_str(&f[F_ISSUED], 1));
    CHECK(opt_str(&f[F_VALUE_STRING], 1));
    int has_period;
    Str start, end;
    CHECK(period_of(&f[F_EFFECTIVE_PERIOD], &has_period, &start, &end));
    Val q[4];
    int has_quantity = present(&f[F_VALUE_QUANTITY]) && f[F_VALUE_QUANTITY].type != J_NULL;
    if (has_quantity) {
        CHECK(get_fields(&f[F_VALUE_QUANTITY], QUANTITY_FIELDS, 4, q));
        for (int i = 1; i < 4; i++) CHECK(opt_str(&q[i], 1));
        if (q[0].type == J_NULL) q[0].type = J_NONE;
        if (q[0].type != J_NONE && q[0].type != J_NUM) return DEFER;
    }
    if (present(&f[F_COMPONENT])) return DEFER;
    Str time;
    const char *field;
    if (f[F_EFFECTIVE_DATETIME].type == J_STR) {
        time = val_str(&f[F_EFFECTIVE_DATETIME]);
        field = "Observation.effectiveDateTime";
    } else if (has_period) {
        if (!start.p) return DEFER;
        time = start;
        field = "Observation.effectivePeriod.start";
    } else if (f[F_EFFECTIVE_INSTANT].type == J_STR) {
        time = val_str(&f[F_EFFECTIVE_INSTANT]);
        field = "Observation.effectiveInstant";
    } else {
        return DEFER;
    }
    Row r;
    memset(&r, 0, sizeof r);
    if (has_quantity) {
        if (q[0].type == J_NUM) {
            CHECK(number_value(&q[0], &r.value));
            r.has_value = 1;
        }
        r.unit = str_or(val_str(&q[1]), val_str(&q[2]));
        r.comparator = val_str(&q[3]);
    } else if (present(&f[F_VALUE_INTEGER]) || present(&f[F_VALUE_DECIMAL]) || present(&f[F_VALUE_CONCEPT]) ||
               present(&f[F_VALUE_BOOLEAN])) {
        return DEFER;
    } else {
        r.text = val_str(&f[F_VALUE_STRING]);
    }
    int64_t sid, eid = 0;
    int has;
    CHECK(subject_of(sc, f, &sid));
    CHECK(encounter_of(sc, f, &eid, &has));
    Str code;
    CHECK(code_field(sc, &f[F_CODE], &code));
    Row full = new_row(sid, T_OBSERVATION);
    full.value = r.value;
    full.has_value = r.has_value;
    full.unit = r.unit;
    full.comparator = r.comparator;
    full.text = r.text;
    full.time = time;
    full.time_field = cstr(field);
    full.code = code;
    full.encounter = eid;
    full.has_encounter = has;
    full.event_type = event_type;
    full.issued = val_str(&f[F_ISSUED]);
    return emit_row(sc, &full, line) < 0 ? FAILED : EMITTED;
}

static NameIndex TOP_INDEX;

/* Flatten one line; EMITTED (type in *type, id in *rid), DEFER or FAILED (a Python error is set). */
static int flatten_line(Scanner *sc, const uchar *p, const uchar *end, int64_t line, int *type, Str *rid_out) {
    Val f[F_COUNT];
    const uchar *after;
    if (walk_object(skip_ws(p, end), end, 0, TOP_FIELDS, F_COUNT, &TOP_INDEX, f, &after) < 0) return DEFER;
    if (skip_ws(after, end) != end) return DEFER;
    if (f[F_RESOURCE_TYPE].type != J_STR || f[F_RESOURCE_TYPE].escaped) return DEFER;
    Str rtype = val_str(&f[F_RESOURCE_TYPE]);
    int t = -1;
    for (int i = 0; i < T_COUNT; i++)
        if (TYPE_NAMES[i].len == rtype.n && memcmp(TYPE_NAMES[i].name, rtype.p, rtype.n) == 0) t = i;
    if (t < 0) return DEFER;
    if (opt_str(&f[F_ID], 1) < 0 || f[F_ID].type != J_STR || f[F_ID].e == f[F_ID].s) return DEFER;
    Str rid = val_str(&f[F_ID]);
    *rid_out = rid;
    *type = t;
    switch (t) {
    case T_PATIENT:
        return flatten_patient(sc, f, rid, line);
    case T_ENCOUNTER:
        return flatten_encounter(sc, f, rid, line);
    case T_CONDITION:
        return flatten_condition(sc, f, line);
    case T_PROCEDURE:
        return flatten_procedure(sc, f, line);
    case T_MEDICATION:
        return flatten_medication(sc, f, rid, line);
    case T_OBSERVATION:
        return flatten_observation(sc, f, line);
    default:
        return flatten_medication_use(sc, f, t, line);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* the Python type                                                                                   */

static void scanner_truncate(Scanner *sc, const size_t *mark) {
    for (int i = 0; i < R_COUNT; i++) col_truncate(&sc->rows[i], mark[0]);
    for (int i = 0; i < K_COUNT; i++) col_truncate(&sc->keys[i], mark[1]);
    for (int i = 0; i < P_COUNT; i++) col_truncate(&sc->patients[i], mark[2]);
    for (int i = 0; i < M_COUNT; i++) col_truncate(&sc->meds[i], mark[3]);
}

static size_t scanner_bytes(Scanner *sc) {
    size_t most = 0;
    for (int i = 0; i < R_COUNT; i++)
        if (sc->rows[i].values.len > most) most = sc->rows[i].values.len;
    for (int i = 0; i < K_COUNT; i++)
        if (sc->keys[i].values.len > most) most = sc->keys[i].values.len;
    return most;
}

static int is_ascii(const uchar *p, size_t n) {
    size_t i = 0;
#if defined(__SSE2__)
    __m128i any = _mm_setzero_si128();
    for (; i + 16 <= n; i += 16) any = _mm_or_si128(any, _mm_loadu_si128((const __m128i *)(p + i)));
    if (_mm_movemask_epi8(any)) return 0;
#endif
    uchar high = 0;
    for (; i < n; i++) high |= p[i];
    return high < 0x80;
}

static int is_blank(const uchar *p, const uchar *end) {
    for (; p < end; p++)
        if (!(*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r' || *p == '\v' || *p == '\f')) return 0;
    return 1;
}

static int scanner_init(Scanner *sc, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"systems", "code_cache", "descriptions", "sample_every", NULL};
    PyObject *systems, *code_cache, *descriptions;
    unsigned long long every = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!|K", kwlist, &PyDict_Type, &systems, &PyDict_Type, &code_cache,
                                     &PyDict_Type, &descriptions, &every))
        return -1;
    Py_XSETREF(sc->systems, Py_NewRef(systems));
    Py_XSETREF(sc->code_cache, Py_NewRef(code_cache));
    Py_XSETREF(sc->descriptions, Py_NewRef(descriptions));
    sc->sample_every = every;
    for (int i = 0; i < R_COUNT; i++) sc->rows[i].kind = ROW_KINDS[i];
    for (int i = 0; i < K_COUNT; i++) sc->keys[i].kind = KEY_KINDS[i];
    for (int i = 0; i < P_COUNT; i++) sc->patients[i].kind = PATIENT_KINDS[i];
    for (int i = 0; i < M_COUNT; i++) sc->meds[i].kind = MED_KINDS[i];
    return 0;
}

static void scanner_dealloc(Scanner *sc) {
    Py_XDECREF(sc->systems);
    Py_XDECREF(sc->code_cache);
    Py_XDECREF(sc->descriptions);
    for (int i = 0; i < R_COUNT; i++) col_free(&sc->rows[i]);
    for (int i = 0; i < K_COUNT; i++) col_free(&sc->keys[i]);
    for (int i = 0; i < P_COUNT; i++) col_free(&sc->patients[i]);
    for (int i = 0; i < M_COUNT; i++) col_free(&sc->meds[i]);
    map_clear(&sc->ids);
    map_clear(&sc->codes);
    map_clear(&sc->described);
    buf_free(&sc->scratch);
    buf_free(&sc->code_copy);
    Py_TYPE(sc)->tp_free((PyObject *)sc);
}

PyDoc_STRVAR(scan_doc,
             "scan(data, pos, line, max_rows, final, validated_at=-1)\n"
             "    -> (pos, line, defer_start, defer_end, sampled)\n\n"
             "Flatten the lines of data[pos:] (numbered from `line`) until a line must be deferred, the rows\n"
             "reach max_rows or the data ends (only newline-terminated lines unless `final`). Returns where to\n"
             "go on and the next line's number; defer_start >= 0 gives data[defer_start:defer_end], the line\n"
             "numbered line - 1 (trailing CRs stripped), which Python must take; `sampled`: it was deferred\n"
             "only because it is sampled for validation (the line starting at `validated_at` is not).");

static PyObject *scanner_scan(Scanner *sc, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos, max_rows, validated_at = -1;
    long long line;
    int final;
    if (!PyArg_ParseTuple(args, "y*nLnp|n", &view, &pos, &line, &max_rows, &final, &validated_at)) return NULL;
    const uchar *data = view.buf;
    size_t size = (size_t)view.len;
    Py_ssize_t defer_start = -1, defer_end = -1;
    int sampled = 0;
    int failed = 0;
    if (pos < 0 || (size_t)pos > size) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pos is outside the data");
        return NULL;
    }
    size_t at = (size_t)pos;
    while (at < size) {
        if ((Py_ssize_t)sc->rows[0].length >= max_rows || scanner_bytes(sc) >= MAX_COLUMN_BYTES) break;
        const uchar *start = data + at;
        const uchar *newline = memchr(start, '\n', size - at);
        if (!newline && !final) break;
        const uchar *end = newline ? newline : data + size;
        size_t next = (size_t)(end - data) + (newline ? 1 : 0);
        const uchar *stripped = end;
        while (stripped > start && stripped[-1] == '\r') stripped--;
        int64_t number = line;
        at = next;
        line++;
        if (stripped == start || is_blank(start, stripped)) continue;
        size_t n = (size_t)(stripped - start);
        int type = -1, got = DEFER;
        if (n <= MAX_LINE_BYTES) {
            uint64_t digest = ((uint64_t)n << 32) | crc32_of(start, n);
            int ascii = is_ascii(start, n);
            sampled = sc->sample_every && digest % sc->sample_every == 0 && start - data != validated_at;
            if (!sampled && (ascii || valid_utf8(start, stripped))) {
                size_t mark[4] = {sc->rows[0].length, sc->keys[0].length, sc->patients[0].length, sc->meds[0].length};
                Str rid = NONE_STR;
                got = flatten_line(sc, start, stripped, number, &type, &rid);
                if (got == EMITTED) {
                    Column *k = sc->keys;
                    if (col_str(&k[K_RTYPE], TYPE_NAMES[type].name, TYPE_NAMES[type].len) < 0 ||
                        col_str(&k[K_ID], rid.p, rid.n) < 0 || col_i64(&k[K_DIGEST], (int64_t)digest) < 0 ||
                        col_i64(&k[K_LINE], number) < 0 || col_i32(&k[K_ENTRY], 0) < 0)
                        got = FAILED;
                }
                if (got != EMITTED) scanner_truncate(sc, mark);
            }
        }
        if (got == FAILED) {
            failed = 1;
            break;
        }
        if (got == DEFER) {
            defer_start = start - data;
            defer_end = stripped - data;
            break;
        }
        if (!sc->counts[type]++) sc->order[sc->ordered++] = type;
    }
    PyBuffer_Release(&view);
    if (failed) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    return Py_BuildValue("(nLnni)", (Py_ssize_t)at, line, defer_start, defer_end, defer_start >= 0 && sampled);
}

PyDoc_STRVAR(drain_doc, "drain_counts() -> [(resource type, resources read)] since the last drain, in order of first appearance");

static PyObject *scanner_drain(Scanner *sc, PyObject *Py_UNUSED(ignored)) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (int i = 0; i < sc->ordered; i++) {
        int t = sc->order[i];
        PyObject *item = Py_BuildValue("(s#L)", TYPE_NAMES[t].name, (Py_ssize_t)TYPE_NAMES[t].len, (long long)sc->counts[t]);
        if (!item || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
        sc->counts[t] = 0;
    }
    sc->ordered = 0;
    return out;
}

static PyObject *columns_take(Column *cols, int count, const int *large) {
    PyObject *out = PyTuple_New(count);
    if (!out) return NULL;
    for (int i = 0; i < count; i++) {
        PyObject *col = col_take(&cols[i], large ? large[i] : 0);
        if (!col) {  /* the batch is lost either way; leave the columns consistent (empty) */
            for (int j = 0; j < count; j++) col_reset(&cols[j]);
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, col);
    }
    for (int i = 0; i < count; i++) col_reset(&cols[i]);
    return out;
}

PyDoc_STRVAR(take_doc,
             "take() -> (rows, keys, patients, medications): each a tuple of columns (length, null_count,\n"
             "validity, offsets, values) for pyarrow.Array.from_buffers; the scanner starts a new batch.");

static PyObject *scanner_take(Scanner *sc, PyObject *Py_UNUSED(ignored)) {
    PyObject *rows = columns_take(sc->rows, R_COUNT, ROW_LARGE);
    PyObject *keys = rows ? columns_take(sc->keys, K_COUNT, NULL) : NULL;
    PyObject *patients = keys ? columns_take(sc->patients, P_COUNT, NULL) : NULL;
    PyObject *meds = patients ? columns_take(sc->meds, M_COUNT, NULL) : NULL;
    if (!meds) {
        Py_XDECREF(rows);
        Py_XDECREF(keys);
        Py_XDECREF(patients);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", rows, keys, patients, meds);
}

static PyObject *scanner_pending(Scanner *sc, void *Py_UNUSED(closure)) {
    return PyLong_FromSize_t(sc->rows[0].length + sc->keys[0].length + sc->meds[0].length);
}

static PyObject *scanner_rows(Scanner *sc, void *Py_UNUSED(closure)) { return PyLong_FromSize_t(sc->rows[0].length); }

static PyMethodDef scanner_methods[] = {
    {"scan", (PyCFunction)scanner_scan, METH_VARARGS, scan_doc},
    {"drain_counts", (PyCFunction)scanner_drain, METH_NOARGS, drain_doc},
    {"take", (PyCFunction)scanner_take, METH_NOARGS, take_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef scanner_getset[] = {
    {"rows", (getter)scanner_rows, NULL, "rows held (not yet taken)", NULL},
    {"pending", (getter)scanner_pending, NULL, "rows, keys and medications held (0: nothing to take)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ScannerType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "odyssey.pipelines._fhir_scan.Scanner",
    .tp_basicsize = sizeof(Scanner),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Flattens NDJSON lines of the common FHIR shapes straight to Arrow-ready columns.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)scanner_init,
    .tp_dealloc = (destructor)scanner_dealloc,
    .tp_methods = scanner_methods,
    .tp_getset = scanner_getset,
};

static PyObject *module_crc32(PyObject *Py_UNUSED(m), PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint32_t c = crc32_of(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    return PyLong_FromUnsignedLong(c);
}

static PyObject *module_stable_id(PyObject *Py_UNUSED(m), PyObject *args) {
    const char *a, *b;
    Py_ssize_t na, nb;
    if (!PyArg_ParseTuple(args, "s#s#", &a, &na, &b, &nb)) return NULL;
    return PyLong_FromLongLong(stable_id2(a, (size_t)na, b, (size_t)nb));
}

static PyObject *module_release_memory(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    pool_release();
    return Py_NewRef(Py_None);
}

static PyObject *module_pooled_bytes(PyObject *Py_UNUSED(m), PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSize_t(pool_bytes);
}

static PyMethodDef module_methods[] = {
    {"release_memory", module_release_memory, METH_NOARGS,
     "release_memory(): free the memory kept for the next batches (blocks still held by Python come back later)"},
    {"pooled_bytes", module_pooled_bytes, METH_NOARGS, "pooled_bytes() -> bytes kept for the next batches"},
    {"crc32", module_crc32, METH_O, "crc32(data) -> zlib's CRC-32 (for tests)"},
    {"stable_id", module_stable_id, METH_VARARGS, "stable_id(prefix, id) -> fhir_flatten.stable_id (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_fhir_scan", "Compiled one-pass FHIR NDJSON reader (see fhir_scan.py).", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fhir_scan(void) {
    crc_init();
#ifdef HAVE_CLMUL_CRC
    __builtin_cpu_init();
    cpu_has_clmul = __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
#endif
    index_build(&TOP_INDEX, TOP_FIELDS, F_COUNT);
    if (PyType_Ready(&ScannerType) < 0 || PyType_Ready(&BlockType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Scanner", (PyObject *)&ScannerType) < 0 ||
        PyModule_AddIntConstant(m, "API", SCANNER_API) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
