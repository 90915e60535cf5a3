/*
 * packed_decoder.c - reference decoder for cvxq-packed version 2 files
 * (specification: docs/packed-format.md of cvxq-export).
 *
 *   cc -std=c99 -O2 -ffp-contract=off -o packed_decoder packed_decoder.c
 *
 *   packed_decoder FILE                  list the quantized tensors (name rows cols)
 *   packed_decoder FILE TENSOR           decode TENSOR, print its checksum
 *   packed_decoder FILE TENSOR OUT.f32   also write the float32 [rows, cols]
 *                                        weight, row-major, little-endian
 *
 * The checksum (16 lowercase hex digits on stdout) is FNV-1a 64 over the row
 * digests, each an FNV-1a 64 of one row's float32 little-endian bytes, taken
 * as 8 little-endian bytes (cvxq_export.formats.packed.weight_checksum).
 *
 * Everything read from the file is bounds-checked before use: a malformed
 * file ends with "packed_decoder: error: ..." on stderr and exit status 1,
 * never an out-of-bounds read. Usage errors exit with status 2. The header's
 * CRC-32 is checked before it is parsed, each buffer's before it is used.
 * Memory use is bounded by the header limit, the buffers of one tensor (all
 * inside the file) and one band of row_group rows of float32; work by the
 * tensor's rows x cols (at most MAX_TENSOR_ELEMENTS, each unit at most
 * MAX_UNIT_SIZE weights).
 *
 * Reconstruction must be IEEE float32 with each operation rounded once
 * (FLT_EVAL_METHOD == 0, no fused multiply-add); the product is stored in a
 * volatile float so no compiler setting can fuse it with the addition.
 */
#define _POSIX_C_SOURCE 200809L
#define _FILE_OFFSET_BITS 64

#include <float.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0 && FLT_EVAL_METHOD != -1
#error "float arithmetic must be evaluated in float precision (FLT_EVAL_METHOD 0); on 32-bit x86 use -msse2 -mfpmath=sse"
#endif

#if defined(_WIN32)
#define FSEEK _fseeki64
#define FTELL _ftelli64
typedef long long file_off;
#else
#include <sys/types.h>
#define FSEEK fseeko
#define FTELL ftello
typedef off_t file_off;
#endif

#define FORMAT_NAME "cvxq-packed"
#define FORMAT_VERSION "2"
#define HEADER_CRC_FIELD "\"header_crc32\":\""
#define ALIGN 64u
#define MAX_HEADER 100000000ull           /* bytes */
#define MAX_JSON_NODES (1 << 21)          /* per JSON document */
#define MAX_JSON_DEPTH 64
#define MAX_UNIT_SIZE (1ull << 12)        /* row_group * col_group */
#define MAX_TENSOR_ELEMENTS (1ull << 32)  /* rows * cols */
#define MAX_BAND_ELEMS (1ull << 26)       /* row_group * cols floats decoded at once (256 MiB) */
#define FNV_OFFSET 0xcbf29ce484222325ull
#define FNV_PRIME 0x100000001b3ull

static void fail(const char *fmt, ...) {
    va_list ap;
    fputs("packed_decoder: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) fail("out of memory allocating %llu bytes", (unsigned long long)n);
    return p;
}

static int mul_ok(uint64_t a, uint64_t b, uint64_t *r) {
    if (a != 0 && b > UINT64_MAX / a) return 0;
    *r = a * b;
    return 1;
}

/* ------------------------------------------------------------------ JSON */

enum { J_OBJ, J_ARR, J_STR, J_NUM, J_TRUE, J_FALSE, J_NULL };

typedef struct {
    int type;
    size_t start, end; /* raw span; for strings the bytes between the quotes */
    int first;         /* first child (object: its keys; a key: its value) */
    int next;          /* next sibling */
    size_t count;      /* children (object: keys) */
} jnode;

typedef struct {
    const char *s;
    size_t n, pos;
    jnode *nodes;
    int nn, cap, depth;
    const char *what; /* which document, for messages */
} jdoc;

static int jnew(jdoc *d, int type, size_t start) {
    if (d->nn == d->cap) {
        int cap = d->cap ? d->cap * 2 : 256;
        if (cap > MAX_JSON_NODES) fail("%s: more than %d JSON values", d->what, MAX_JSON_NODES);
        jnode *nodes = realloc(d->nodes, (size_t)cap * sizeof(jnode));
        if (!nodes) fail("out of memory parsing %s", d->what);
        d->nodes = nodes;
        d->cap = cap;
    }
    jnode *nd = &d->nodes[d->nn];
    nd->type = type;
    nd->start = nd->end = start;
    nd->first = nd->next = -1;
    nd->count = 0;
    return d->nn++;
}

static void jfail(jdoc *d, const char *msg) {
    fail("%s is not valid JSON: %s at byte %llu", d->what, msg, (unsigned long long)d->pos);
}

static void jws(jdoc *d) {
    while (d->pos < d->n) {
        char c = d->s[d->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
        d->pos++;
    }
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int jvalue(jdoc *d);

static int jstring(jdoc *d) {
    int id = jnew(d, J_STR, d->pos + 1);
    d->pos++; /* opening quote */
    for (;;) {
        if (d->pos >= d->n) jfail(d, "unterminated string");
        unsigned char c = (unsigned char)d->s[d->pos];
        if (c == '"') break;
        if (c < 0x20) jfail(d, "control character in string");
        if (c == '\\') {
            if (d->pos + 1 >= d->n) jfail(d, "unterminated escape");
            char e = d->s[d->pos + 1];
            if (e == 'u') {
                if (d->pos + 5 >= d->n) jfail(d, "short \\u escape");
                for (int i = 2; i < 6; i++)
                    if (hexval(d->s[d->pos + i]) < 0) jfail(d, "bad \\u escape");
                d->pos += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == 0) jfail(d, "bad escape");
            d->pos += 2;
            continue;
        }
        d->pos++;
    }
    d->nodes[id].end = d->pos;
    d->pos++; /* closing quote */
    return id;
}

static int jnumber(jdoc *d) {
    int id = jnew(d, J_NUM, d->pos);
    size_t p = d->pos;
    if (p < d->n && d->s[p] == '-') p++;
    if (p >= d->n) jfail(d, "bad number");
    if (d->s[p] == '0') {
        p++;
    } else if (d->s[p] >= '1' && d->s[p] <= '9') {
        while (p < d->n && d->s[p] >= '0' && d->s[p] <= '9') p++;
    } else {
        jfail(d, "bad number");
    }
    if (p < d->n && d->s[p] == '.') {
        p++;
        if (p >= d->n || d->s[p] < '0' || d->s[p] > '9') jfail(d, "bad fraction");
        while (p < d->n && d->s[p] >= '0' && d->s[p] <= '9') p++;
    }
    if (p < d->n && (d->s[p] == 'e' || d->s[p] == 'E')) {
        p++;
        if (p < d->n && (d->s[p] == '+' || d->s[p] == '-')) p++;
        if (p >= d->n || d->s[p] < '0' || d->s[p] > '9') jfail(d, "bad exponent");
        while (p < d->n && d->s[p] >= '0' && d->s[p] <= '9') p++;
    }
    d->nodes[id].end = p;
    d->pos = p;
    return id;
}

static int jliteral(jdoc *d, const char *word, int type) {
    size_t len = strlen(word);
    if (d->n - d->pos < len || memcmp(d->s + d->pos, word, len) != 0) jfail(d, "unexpected character");
    int id = jnew(d, type, d->pos);
    d->pos += len;
    d->nodes[id].end = d->pos;
    return id;
}

static int jcontainer(jdoc *d, int is_obj) {
    if (++d->depth > MAX_JSON_DEPTH) jfail(d, "nested too deeply");
    int id = jnew(d, is_obj ? J_OBJ : J_ARR, d->pos);
    char close = is_obj ? '}' : ']';
    int last = -1;
    d->pos++;
    jws(d);
    if (d->pos < d->n && d->s[d->pos] == close) {
        d->pos++;
    } else {
        for (;;) {
            int child;
            jws(d);
            if (is_obj) {
                if (d->pos >= d->n || d->s[d->pos] != '"') jfail(d, "expected a string key");
                child = jstring(d);
                jws(d);
                if (d->pos >= d->n || d->s[d->pos] != ':') jfail(d, "expected ':'");
                d->pos++;
                int value = jvalue(d);
                d->nodes[child].first = value;
            } else {
                child = jvalue(d);
            }
            if (last < 0) d->nodes[id].first = child;
            else d->nodes[last].next = child;
            last = child;
            d->nodes[id].count++;
            jws(d);
            if (d->pos >= d->n) jfail(d, "unterminated object or array");
            if (d->s[d->pos] == ',') { d->pos++; continue; }
            if (d->s[d->pos] == close) { d->pos++; break; }
            jfail(d, "expected ',' or a closing bracket");
        }
    }
    d->nodes[id].end = d->pos;
    d->depth--;
    return id;
}

static int jvalue(jdoc *d) {
    jws(d);
    if (d->pos >= d->n) jfail(d, "unexpected end");
    switch (d->s[d->pos]) {
    case '{': return jcontainer(d, 1);
    case '[': return jcontainer(d, 0);
    case '"': return jstring(d);
    case 't': return jliteral(d, "true", J_TRUE);
    case 'f': return jliteral(d, "false", J_FALSE);
    case 'n': return jliteral(d, "null", J_NULL);
    default:
        if (d->s[d->pos] == '-' || (d->s[d->pos] >= '0' && d->s[d->pos] <= '9')) return jnumber(d);
        jfail(d, "unexpected character");
    }
    return -1;
}

static void jparse(jdoc *d, const char *s, size_t n, const char *what) {
    memset(d, 0, sizeof *d);
    d->s = s;
    d->n = n;
    d->what = what;
    jvalue(d);
    jws(d);
    if (d->pos != d->n) jfail(d, "trailing characters");
}

static void put_utf8(char *out, size_t *k, uint32_t cp) {
    if (cp < 0x80) {
        out[(*k)++] = (char)cp;
    } else if (cp < 0x800) {
        out[(*k)++] = (char)(0xC0 | (cp >> 6));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        out[(*k)++] = (char)(0xE0 | (cp >> 12));
        out[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    } else {
        out[(*k)++] = (char)(0xF0 | (cp >> 18));
        out[(*k)++] = (char)(0x80 | ((cp >> 12) & 0x3F));
        out[(*k)++] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[(*k)++] = (char)(0x80 | (cp & 0x3F));
    }
}

static uint32_t hex4(const char *p) {
    return (uint32_t)(hexval(p[0]) << 12 | hexval(p[1]) << 8 | hexval(p[2]) << 4 | hexval(p[3]));
}

/* Decoded bytes of a (validated) string node, NUL-terminated; *len excludes the NUL. */
static char *jstr(const jdoc *d, int id, size_t *len) {
    const jnode *nd = &d->nodes[id];
    const char *s = d->s;
    char *out = xmalloc(nd->end - nd->start + 1); /* decoding never grows a string */
    size_t k = 0;
    for (size_t i = nd->start; i < nd->end;) {
        if (s[i] != '\\') { out[k++] = s[i++]; continue; }
        char e = s[i + 1];
        if (e != 'u') {
            const char *from = "\"\\/bfnrt", *to = "\"\\/\b\f\n\r\t";
            out[k++] = to[strchr(from, e) - from];
            i += 2;
            continue;
        }
        uint32_t cp = hex4(s + i + 2);
        i += 6;
        if (cp >= 0xD800 && cp < 0xDC00 && i + 6 <= nd->end && s[i] == '\\' && s[i + 1] == 'u') {
            uint32_t lo = hex4(s + i + 2);
            if (lo >= 0xDC00 && lo < 0xE000) {
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                i += 6;
            }
        }
        put_utf8(out, &k, cp);
    }
    out[k] = 0;
    if (len) *len = k;
    return out;
}

static int jstr_eq(const jdoc *d, int id, const char *want) {
    const jnode *nd = &d->nodes[id];
    size_t wl = strlen(want), n = nd->end - nd->start;
    if (!memchr(d->s + nd->start, '\\', n)) return n == wl && memcmp(d->s + nd->start, want, n) == 0;
    size_t len;
    char *s = jstr(d, id, &len);
    int eq = len == wl && memcmp(s, want, len) == 0;
    free(s);
    return eq;
}

/* Value of key in object obj, -1 if absent; a key present twice is an error. */
static int jget(const jdoc *d, int obj, const char *key) {
    int found = -1;
    for (int k = d->nodes[obj].first; k >= 0; k = d->nodes[k].next) {
        if (jstr_eq(d, k, key)) {
            if (found >= 0) fail("%s: key \"%s\" appears twice", d->what, key);
            found = d->nodes[k].first;
        }
    }
    return found;
}

static int jis(const jdoc *d, int id, int type) { return id >= 0 && d->nodes[id].type == type; }

/* A non-negative JSON integer without fraction or exponent. */
static int ju64(const jdoc *d, int id, uint64_t *out) {
    if (!jis(d, id, J_NUM)) return 0;
    const jnode *nd = &d->nodes[id];
    uint64_t v = 0;
    for (size_t i = nd->start; i < nd->end; i++) {
        char c = d->s[i];
        if (c < '0' || c > '9') return 0;
        uint64_t digit = (uint64_t)(c - '0');
        if (v > (UINT64_MAX - digit) / 10) return 0;
        v = v * 10 + digit;
    }
    *out = v;
    return 1;
}

/* ------------------------------------------------------------------ file */

typedef struct {
    FILE *f;
    uint64_t size;
    const char *path;
} pfile;

static void read_at(const pfile *pf, uint64_t off, void *dst, uint64_t len) {
    if (off > pf->size || len > pf->size - off) fail("read of %llu bytes at %llu runs past the end of the file", (unsigned long long)len, (unsigned long long)off);
    if (len == 0) return;
    if (FSEEK(pf->f, (file_off)off, SEEK_SET) != 0) fail("cannot seek in %s", pf->path);
    if (fread(dst, 1, (size_t)len, pf->f) != (size_t)len) fail("cannot read %s (truncated?)", pf->path);
}

typedef struct {
    char *name;
    int dtype; /* 0 U8, 1 F16, 2 F32 */
    int ndim;
    uint64_t dim0, count, begin, end; /* begin/end: absolute file offsets */
} entry;

static const char *DTYPE_NAMES[3] = {"U8", "F16", "F32"};
static const unsigned DTYPE_SIZES[3] = {1, 2, 4};

static int cmp_offsets(const void *a, const void *b) {
    const entry *x = *(const entry *const *)a, *y = *(const entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return 0;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp((*(const entry *const *)a)->name, (*(const entry *const *)b)->name);
}

static const entry *find_entry(entry *const *by_name, size_t n, const char *name) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(by_name[mid]->name, name);
        if (c == 0) return by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

/* ------------------------------------------------------------------ numbers */

static uint32_t CRC_TABLE[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        CRC_TABLE[i] = c;
    }
}

/* CRC-32 (zlib's) continued over p[0..n): start with c = 0, feed the pieces in order */
static uint32_t crc32_update(uint32_t c, const unsigned char *p, uint64_t n) {
    c ^= 0xFFFFFFFFu;
    for (uint64_t i = 0; i < n; i++) c = CRC_TABLE[(c ^ p[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static uint32_t crc32_of(const unsigned char *p, uint64_t n) { return crc32_update(0, p, n); }

/* Where the header checksum's 8 hex digits start: the field must appear exactly once */
static size_t header_crc_position(const char *h, size_t n) {
    const size_t flen = strlen(HEADER_CRC_FIELD);
    size_t found = 0, at = 0;
    for (size_t i = 0; i + flen <= n; i++)
        if (h[i] == '"' && memcmp(h + i, HEADER_CRC_FIELD, flen) == 0) {
            if (found++) fail("the header has more than one header_crc32 field");
            at = i + flen;
        }
    if (!found) fail("the header has no header_crc32 field");
    if (at + 9 > n || h[at + 8] != '"') fail("header_crc32 is not 8 lowercase hex digits");
    for (size_t i = at; i < at + 8; i++)
        if (!((h[i] >= '0' && h[i] <= '9') || (h[i] >= 'a' && h[i] <= 'f'))) fail("header_crc32 is not 8 lowercase hex digits");
    return at;
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal half: normalise */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static float f32_le(const unsigned char *p) {
    uint32_t bits = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint64_t fnv_bytes(uint64_t h, const unsigned char *p, size_t n) {
    for (size_t i = 0; i < n; i++) { h ^= p[i]; h *= FNV_PRIME; }
    return h;
}

/* ------------------------------------------------------------------ main */

typedef struct {
    const entry *e;
    unsigned char *data;
} loaded_buf;

static loaded_buf load_checked(const pfile *pf, const jdoc *crcs, int crc_obj, const entry *e) {
    loaded_buf b = {e, NULL};
    uint64_t n = e->end - e->begin;
    b.data = xmalloc((size_t)n);
    read_at(pf, e->begin, b.data, n);
    int want = jget(crcs, crc_obj, e->name);
    if (!jis(crcs, want, J_STR)) fail("%s: no crc32 checksum in the header", e->name);
    char *hex = jstr(crcs, want, NULL);
    char got[9];
    snprintf(got, sizeof got, "%08lx", (unsigned long)crc32_of(b.data, n));
    if (strlen(hex) != 8 || strcmp(hex, got) != 0) fail("%s: crc32 %s does not match the stored %s (corrupted data)", e->name, got, hex);
    free(hex);
    return b;
}

static const entry *need(entry *const *by_name, size_t n, const char *tensor, const char *suffix, int dtype) {
    size_t len = strlen(tensor) + strlen(suffix) + 2;
    char *name = xmalloc(len);
    snprintf(name, len, "%s.%s", tensor, suffix);
    const entry *e = find_entry(by_name, n, name);
    if (!e) fail("buffer %s is missing", name);
    if (e->dtype != dtype || e->ndim != 1) fail("buffer %s must be 1-D %s", name, DTYPE_NAMES[dtype]);
    free(name);
    return e;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 4) {
        fprintf(stderr, "usage: packed_decoder FILE [TENSOR [OUT.f32]]\n");
        return 2;
    }
    crc_init();
    pfile pf = {fopen(argv[1], "rb"), 0, argv[1]};
    if (!pf.f) fail("cannot open %s", argv[1]);
    if (FSEEK(pf.f, 0, SEEK_END) != 0) fail("cannot seek in %s", argv[1]);
    {
        long long sz = (long long)FTELL(pf.f);
        if (sz < 0) fail("cannot size %s", argv[1]);
        pf.size = (uint64_t)sz;
    }

    /* ---- header length and header */
    unsigned char lenbuf[8];
    if (pf.size < 8) fail("the file has %llu bytes, fewer than the 8-byte header length (truncated?)", (unsigned long long)pf.size);
    read_at(&pf, 0, lenbuf, 8);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | lenbuf[i];
    if (hlen > MAX_HEADER) fail("header length %llu exceeds the limit of %llu bytes", (unsigned long long)hlen, MAX_HEADER);
    if (hlen < 2) fail("header length %llu is too small", (unsigned long long)hlen);
    if (hlen > pf.size - 8) fail("header length %llu runs past the end of the %llu-byte file (truncated?)", (unsigned long long)hlen, (unsigned long long)pf.size);
    char *header = xmalloc((size_t)hlen + 1);
    read_at(&pf, 8, header, hlen);
    header[hlen] = 0;
    if (header[0] != '{') fail("the header does not start with '{'");
    uint64_t data_start = 8 + hlen, data_len = pf.size - data_start;
    if (data_start % ALIGN) fail("the data section starts at byte %llu, not on a %u-byte boundary", (unsigned long long)data_start, ALIGN);
    /* the header checksum: CRC-32 of the length and the header, its own 8 digits read as '0' */
    size_t crc_at = header_crc_position(header, (size_t)hlen);
    char stored_crc[9], header_crc[9];
    memcpy(stored_crc, header + crc_at, 8);
    stored_crc[8] = 0;
    memset(header + crc_at, '0', 8);
    snprintf(header_crc, sizeof header_crc, "%08lx",
             (unsigned long)crc32_update(crc32_of(lenbuf, 8), (const unsigned char *)header, hlen));
    memcpy(header + crc_at, stored_crc, 8);
    if (strcmp(header_crc, stored_crc) != 0) fail("header crc32 %s does not match the stored %s (corrupted or edited header)", header_crc, stored_crc);

    jdoc top;
    jparse(&top, header, (size_t)hlen, "the header");
    if (!jis(&top, 0, J_OBJ)) fail("the header is not a JSON object");

    /* ---- every entry: dtype, shape, offsets, bounds, alignment */
    size_t n_entries = top.nodes[0].count, k = 0;
    entry *entries = xmalloc(n_entries * sizeof(entry));
    int meta = -1;
    for (int key = top.nodes[0].first; key >= 0; key = top.nodes[key].next) {
        int val = top.nodes[key].first;
        if (jstr_eq(&top, key, "__metadata__")) {
            if (meta >= 0) fail("__metadata__ appears twice");
            meta = val;
            continue;
        }
        entry *e = &entries[k++];
        size_t name_len;
        e->name = jstr(&top, key, &name_len);
        if (strlen(e->name) != name_len) fail("a tensor name contains a NUL character");
        if (!jis(&top, val, J_OBJ) || top.nodes[val].count != 3) fail("entry %s must be an object with dtype, shape and data_offsets", e->name);
        int dt = jget(&top, val, "dtype"), sh = jget(&top, val, "shape"), of = jget(&top, val, "data_offsets");
        if (!jis(&top, dt, J_STR) || !jis(&top, sh, J_ARR) || !jis(&top, of, J_ARR)) fail("entry %s must be an object with dtype, shape and data_offsets", e->name);
        e->dtype = -1;
        for (int t = 0; t < 3; t++)
            if (jstr_eq(&top, dt, DTYPE_NAMES[t])) e->dtype = t;
        if (e->dtype < 0) fail("%s: dtype is not one of U8, F16, F32", e->name);
        e->ndim = (int)top.nodes[sh].count;
        e->count = 1;
        e->dim0 = 0;
        int first = 1;
        for (int s = top.nodes[sh].first; s >= 0; s = top.nodes[s].next) {
            uint64_t dim;
            if (!ju64(&top, s, &dim)) fail("%s: shape is not a list of non-negative integers", e->name);
            if (first) e->dim0 = dim;
            first = 0;
            if (!mul_ok(e->count, dim, &e->count)) fail("%s: shape overflows", e->name);
        }
        uint64_t begin, end, bytes;
        if (top.nodes[of].count != 2 || !ju64(&top, top.nodes[of].first, &begin) ||
            !ju64(&top, top.nodes[top.nodes[of].first].next, &end))
            fail("%s: data_offsets is not two non-negative integers", e->name);
        if (begin > end) fail("%s: data_offsets are not ordered", e->name);
        if (end > data_len) fail("%s: bytes [%llu, %llu) run past the end of the data section (%llu bytes; truncated?)", e->name,
                                 (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_len);
        if (!mul_ok(e->count, DTYPE_SIZES[e->dtype], &bytes) || bytes != end - begin)
            fail("%s: shape and dtype do not match the data_offsets span", e->name);
        e->begin = data_start + begin;
        e->end = data_start + end;
        if (strncmp(e->name, "__pad__.", 8) != 0 && e->begin % ALIGN) fail("%s: not on a %u-byte boundary", e->name, ALIGN);
    }
    n_entries = k;
    if (meta < 0 || !jis(&top, meta, J_OBJ)) fail("__metadata__ is missing or not an object");
    entry **by_off = xmalloc((n_entries + 1) * sizeof(entry *)), **by_name = xmalloc((n_entries + 1) * sizeof(entry *));
    for (size_t i = 0; i < n_entries; i++) by_off[i] = by_name[i] = &entries[i];
    qsort(by_off, n_entries, sizeof(entry *), cmp_offsets);
    for (size_t i = 1; i < n_entries; i++)
        if (by_off[i]->begin < by_off[i - 1]->end) fail("buffers %s and %s overlap", by_off[i - 1]->name, by_off[i]->name);
    if ((n_entries ? by_off[n_entries - 1]->end : data_start) != pf.size) fail("the data section has bytes after its last buffer");
    qsort(by_name, n_entries, sizeof(entry *), cmp_names);
    for (size_t i = 1; i < n_entries; i++)
        if (strcmp(by_name[i]->name, by_name[i - 1]->name) == 0) fail("buffer %s appears twice", by_name[i]->name);

    /* ---- metadata */
    for (int key = top.nodes[meta].first; key >= 0; key = top.nodes[key].next)
        if (!jis(&top, top.nodes[key].first, J_STR)) fail("__metadata__ values must be strings");
    int fmt = jget(&top, meta, "format"), ver = jget(&top, meta, "version"), ck = jget(&top, meta, "checksum");
    if (fmt < 0 || !jstr_eq(&top, fmt, FORMAT_NAME)) fail("not a %s file", FORMAT_NAME);
    if (ver < 0 || !jstr_eq(&top, ver, FORMAT_VERSION)) {
        char *v = ver >= 0 ? jstr(&top, ver, NULL) : NULL;
        fail("unsupported %s version \"%s\"; this decoder knows version " FORMAT_VERSION, FORMAT_NAME, v ? v : "(none)");
    }
    if (ck < 0 || !jstr_eq(&top, ck, "crc32")) fail("unknown checksum algorithm (version " FORMAT_VERSION " uses crc32)");
    int hc = jget(&top, meta, "header_crc32");
    if (hc < 0 || !jstr_eq(&top, hc, stored_crc)) fail("__metadata__ header_crc32 is not the header's one checksum field");
    int tmeta = jget(&top, meta, "tensors"), cmeta = jget(&top, meta, "crc32");
    if (tmeta < 0 || cmeta < 0) fail("__metadata__ lacks \"tensors\" or \"crc32\"");
    size_t tlen, clen;
    char *tjson = jstr(&top, tmeta, &tlen), *cjson = jstr(&top, cmeta, &clen);
    jdoc tensors, crcs;
    jparse(&tensors, tjson, tlen, "__metadata__ tensors");
    jparse(&crcs, cjson, clen, "__metadata__ crc32");
    if (!jis(&tensors, 0, J_OBJ) || !jis(&crcs, 0, J_OBJ)) fail("__metadata__ tensors and crc32 must be JSON objects");

    if (argc == 2) { /* list */
        for (int key = tensors.nodes[0].first; key >= 0; key = tensors.nodes[key].next) {
            int t = tensors.nodes[key].first, sh = jis(&tensors, t, J_OBJ) ? jget(&tensors, t, "shape") : -1;
            uint64_t rows = 0, cols = 0;
            if (!jis(&tensors, sh, J_ARR) || tensors.nodes[sh].count != 2 || !ju64(&tensors, tensors.nodes[sh].first, &rows) ||
                !ju64(&tensors, tensors.nodes[tensors.nodes[sh].first].next, &cols))
                fail("a tensor entry has no valid shape");
            char *name = jstr(&tensors, key, NULL);
            printf("%s %llu %llu\n", name, (unsigned long long)rows, (unsigned long long)cols);
            free(name);
        }
        return 0;
    }

    /* ---- the tensor's geometry */
    const char *tname = argv[2];
    int t = jget(&tensors, 0, tname);
    if (t < 0) fail("no quantized tensor named %s in %s", tname, argv[1]);
    if (!jis(&tensors, t, J_OBJ)) fail("tensor %s: entry is not an object", tname);
    int sh = jget(&tensors, t, "shape"), rgn = jget(&tensors, t, "row_group"), cgn = jget(&tensors, t, "col_group");
    uint64_t rows, cols, r, c;
    if (!jis(&tensors, sh, J_ARR) || tensors.nodes[sh].count != 2 || !ju64(&tensors, tensors.nodes[sh].first, &rows) ||
        !ju64(&tensors, tensors.nodes[tensors.nodes[sh].first].next, &cols) || rows == 0 || cols == 0)
        fail("tensor %s: shape is not [rows, cols] of positive integers", tname);
    if (!ju64(&tensors, rgn, &r) || !ju64(&tensors, cgn, &c) || r == 0 || c == 0)
        fail("tensor %s: row_group and col_group must be positive integers", tname);
    if (rows % r || cols % c) fail("tensor %s: units of %llux%llu do not tile [%llu, %llu]", tname, (unsigned long long)r,
                                   (unsigned long long)c, (unsigned long long)rows, (unsigned long long)cols);
    uint64_t unit_size, n_units, band;
    if (!mul_ok(r, c, &unit_size) || unit_size > MAX_UNIT_SIZE) fail("tensor %s: unit size exceeds the limit %llu", tname, MAX_UNIT_SIZE);
    if (!mul_ok(rows / r, cols / c, &n_units)) fail("tensor %s: too many units", tname);
    if (rows > MAX_TENSOR_ELEMENTS / cols) fail("tensor %s: [%llu, %llu] exceeds the limit of %llu weights per tensor", tname,
                                               (unsigned long long)rows, (unsigned long long)cols, MAX_TENSOR_ELEMENTS);
    if (!mul_ok(r, cols, &band) || band > MAX_BAND_ELEMS) fail("tensor %s: a band of %llu rows x %llu columns exceeds this decoder's limit", tname,
                                                               (unsigned long long)r, (unsigned long long)cols);

    /* ---- its buffers */
    const entry *e_codes = need(by_name, n_entries, tname, "codes", 0), *e_map = need(by_name, n_entries, tname, "map", 0),
                *e_off = need(by_name, n_entries, tname, "offset", 1), *e_scale = need(by_name, n_entries, tname, "scale", 1);
    if (e_map->dim0 != n_units || e_off->dim0 != n_units)
        fail("tensor %s: map and offset must hold %llu values (one per unit)", tname, (unsigned long long)n_units);
    loaded_buf map = load_checked(&pf, &crcs, 0, e_map);
    uint64_t sum_bits = 0, n_scaled = 0;
    int companded[9] = {0};
    for (uint64_t u = 0; u < n_units; u++) {
        unsigned m = map.data[u], b = m & 0x0F;
        if (b > 8 || (m >> 5)) fail("tensor %s: unit %llu has map byte 0x%02x: bits must be 0..8, kind 0..1, bits 5-7 zero", tname, (unsigned long long)u, m);
        sum_bits += b;
        if (b) n_scaled++;
        if (b && (m >> 4)) companded[b] = 1;
    }
    uint64_t total_bits, code_bytes;
    if (!mul_ok(sum_bits, unit_size, &total_bits)) fail("tensor %s: code size overflows", tname);
    code_bytes = total_bits / 8 + (total_bits % 8 != 0);
    if (e_codes->dim0 != code_bytes) fail("tensor %s: codes hold %llu bytes, the map needs %llu", tname, (unsigned long long)e_codes->dim0, (unsigned long long)code_bytes);
    if (e_scale->dim0 != n_scaled) fail("tensor %s: scale holds %llu values, expected %llu (units with bits > 0)", tname,
                                        (unsigned long long)e_scale->dim0, (unsigned long long)n_scaled);
    loaded_buf codes = load_checked(&pf, &crcs, 0, e_codes), off = load_checked(&pf, &crcs, 0, e_off),
               scale = load_checked(&pf, &crcs, 0, e_scale);
    if (total_bits % 8 && (codes.data[code_bytes - 1] >> (total_bits % 8)))
        fail("tensor %s: the unused high bits of the last code byte are not zero", tname);
    for (uint64_t i = 0; i < n_units; i++) /* exponent all ones: infinity or NaN */
        if (((off.data[2 * i + 1] >> 2) & 0x1F) == 0x1F) fail("tensor %s: offset holds an infinite or NaN value", tname);
    for (uint64_t i = 0; i < n_scaled; i++)
        if (((scale.data[2 * i + 1] >> 2) & 0x1F) == 0x1F) fail("tensor %s: scale holds an infinite or NaN value", tname);
    float *levels[9] = {NULL};
    for (int b = 1; b <= 8; b++) {
        if (!companded[b]) continue;
        char name[32];
        snprintf(name, sizeof name, "__levels__.b%d", b);
        const entry *e = find_entry(by_name, n_entries, name);
        if (!e || e->dtype != 2 || e->ndim != 1 || e->dim0 != (1ull << b)) fail("companded units at %d bits but no F32 [%d] %s", b, 1 << b, name);
        loaded_buf lb = load_checked(&pf, &crcs, 0, e);
        levels[b] = xmalloc(sizeof(float) << b);
        for (int i = 0; i < (1 << b); i++) {
            levels[b][i] = f32_le(lb.data + 4 * i);
            if (!(levels[b][i] - levels[b][i] == 0.0f)) fail("%s holds an infinite or NaN level", name);
        }
        free(lb.data);
    }

    /* ---- decode, one band of row_group rows at a time */
    FILE *raw = NULL;
    if (argc == 4 && !(raw = fopen(argv[3], "wb"))) fail("cannot write %s", argv[3]);
    float *buf = xmalloc((size_t)band * sizeof(float));
    uint64_t n_cg = cols / c, bitpos = 0, si = 0, h = FNV_OFFSET, u = 0;
    unsigned char *row_bytes = xmalloc((size_t)cols * 4);
    for (uint64_t rg = 0; rg < rows / r; rg++) {
        for (uint64_t cg = 0; cg < n_cg; cg++, u++) {
            unsigned m = map.data[u], b = m & 0x0F, kind = (m >> 4) & 1;
            float o = half_to_float((uint16_t)(off.data[2 * u] | off.data[2 * u + 1] << 8)), s = 0.0f;
            if (b) { s = half_to_float((uint16_t)(scale.data[2 * si] | scale.data[2 * si + 1] << 8)); si++; }
            for (uint64_t j = 0; j < unit_size; j++) {
                float v = o;
                if (b) {
                    uint64_t byte = bitpos >> 3;
                    unsigned shift = (unsigned)(bitpos & 7), word = codes.data[byte];
                    if (shift + b > 8) word |= (unsigned)codes.data[byte + 1] << 8; /* in bounds: total_bits checked */
                    unsigned code = (word >> shift) & ((1u << b) - 1);
                    bitpos += b;
                    volatile float prod = kind ? s * levels[b][code] : (float)code * s;
                    v = o + prod;
                }
                buf[(j / c) * cols + cg * c + j % c] = v;
            }
        }
        for (uint64_t i = 0; i < r; i++) {
            for (uint64_t x = 0; x < cols; x++) {
                uint32_t bits;
                memcpy(&bits, &buf[i * cols + x], 4);
                row_bytes[4 * x] = (unsigned char)bits;
                row_bytes[4 * x + 1] = (unsigned char)(bits >> 8);
                row_bytes[4 * x + 2] = (unsigned char)(bits >> 16);
                row_bytes[4 * x + 3] = (unsigned char)(bits >> 24);
            }
            uint64_t rh = fnv_bytes(FNV_OFFSET, row_bytes, (size_t)cols * 4);
            unsigned char le[8];
            for (int q = 0; q < 8; q++) le[q] = (unsigned char)(rh >> (8 * q));
            h = fnv_bytes(h, le, 8);
            if (raw && fwrite(row_bytes, 1, (size_t)cols * 4, raw) != (size_t)cols * 4) fail("cannot write %s", argv[3]);
        }
    }
    if (raw && fclose(raw) != 0) fail("cannot write %s", argv[3]);
    printf("%016llx\n", (unsigned long long)h);

    free(row_bytes);
    free(buf);
    for (int b = 1; b <= 8; b++) free(levels[b]);
    free(map.data);
    free(codes.data);
    free(off.data);
    free(scale.data);
    free(tensors.nodes);
    free(crcs.nodes);
    free(tjson);
    free(cjson);
    for (size_t i = 0; i < n_entries; i++) free(entries[i].name);
    free(entries);
    free(by_off);
    free(by_name);
    free(top.nodes);
    free(header);
    fclose(pf.f);
    return 0;
}
