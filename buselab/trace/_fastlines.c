/* The trace writer's lines for a frame of reads, in C.
 *
 * buselab/trace/writer.py turns each frame of packed records (wire.py) into
 * JSON lines. In Python that costs about 1.2 us a request, most of it the
 * %-formatting of eleven fields; on a 2-core machine the writer process
 * takes that time from the client and the server, and recording reads at 4
 * jobs x iodepth 8 cost about 4% more IOPS than with the lines made here.
 *
 * format_frame(body, start, names, hold[, labels]) -> (lines, counts, held) | None
 *
 * body is one frame (a u32 count, then that many RECORDs); start is the
 * trace's start time (record times are written relative to it); names are
 * the eight op names, as bytes. It returns the lines, sorted by seq, exactly
 * as writer.py's Python loop would write them, and how many records each
 * command 0-7 had. The records within `hold` of the frame's biggest seq are
 * not written: they come back in `held` (the records as they were, in seq
 * order), for the caller to put in front of the next frame (writer.py's
 * HOLD says why). It returns None, and the caller does it all in Python,
 * when the frame has anything else: a payload to encode (IN_RING, INLINE), a
 * command without a name, a time that is not a finite number, or a
 * big-endian host.
 *
 * labels, when the writer has the disk's map (labelling.py), is that map's
 * lookup table: (starts, ends, ranks, suffixes, gap, mask). starts and ends
 * are the regions' bounds (u64 little-endian each, sorted), ranks one byte
 * per region (how telling its kind is), suffixes the bytes each region's
 * label adds to a line, gap what a request touching no region gets, mask the
 * commands labelled (bit = command). A request is looked up as FsMap.label
 * looks it up without data (two bisects; a request over several regions is
 * named by the most telling of the first 17, with ,"more":N): lines come out
 * as RecordLabels.suffix makes them in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* RECORD = "<QdHHQIdIIQBQI" in wire.py: offsets of its fields. */
enum {
    OFF_SEQ = 0, OFF_T = 8, OFF_CMD = 16, OFF_FLAGS = 18, OFF_OFFSET = 20, OFF_LENGTH = 28,
    OFF_LATENCY = 32, OFF_ERROR = 40, OFF_CONN = 44, OFF_HANDLE = 48, OFF_KIND = 56,
    OFF_EXTRA = 57, OFF_N = 65, RECORD_SIZE = 69
};
enum { NO_DATA = 0, CRC = 1 };
#define NAMES 8
#define LINE_MAX_BYTES 400 /* more than the longest line: 8 numbers of 20 digits, 2 of 26, a 32-byte name, keys */

typedef struct {
    uint64_t seq;
    const unsigned char *rec;
} entry;

/* Fields are little-endian and unaligned: read them with memcpy (checked: the host is little-endian). */
static inline uint64_t u64(const unsigned char *p) { uint64_t v; memcpy(&v, p, sizeof v); return v; }
static inline uint32_t u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, sizeof v); return v; }
static inline uint16_t u16(const unsigned char *p) { uint16_t v; memcpy(&v, p, sizeof v); return v; }
static inline double f64(const unsigned char *p) { double v; memcpy(&v, p, sizeof v); return v; }

/* The line is built by hand: glibc's snprintf took as long per line as Python's %-formatting. */
static inline char *put(char *p, const char *text) {
    size_t n = strlen(text);
    memcpy(p, text, n);
    return p + n;
}

static char *put_u64(char *p, uint64_t v) {
    char digits[20];
    int n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = digits[--n];
    return p;
}

static char *put_hex8(char *p, uint32_t v) {
    static const char hex[] = "0123456789abcdef";
    for (int shift = 28; shift >= 0; shift -= 4)
        *p++ = hex[(v >> shift) & 15];
    return p;
}

/* x with `decimals` digits after the point, rounded as Python's '%.*f' % x rounds it (exactly:
 * half to even on the binary value). Fast when x * 10^decimals stays below 2^40: the product's
 * rounding error is then below 2^-12, so unless its fraction is within 2^-10 of one half, it
 * rounds the way the exact value does. Near such a tie, and for bigger numbers, snprintf
 * (which rounds exactly, like Python) does it. */
static char *put_fixed(char *p, double x, int decimals) {
    static const double scale[] = {1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9};
    static const uint64_t iscale[] = {1, 10, 100, 1000, 10000, 100000, 1000000, 10000000, 100000000, 1000000000};
    double y = fabs(x) * scale[decimals];
    if (y < 1099511627776.0) { /* 2^40 */
        double whole = floor(y);
        double frac = y - whole;
        if (fabs(frac - 0.5) > 1.0 / 1024) {
            uint64_t r = (uint64_t)whole + (frac > 0.5);
            if (signbit(x))
                *p++ = '-';
            p = put_u64(p, r / iscale[decimals]);
            *p++ = '.';
            uint64_t fraction = r % iscale[decimals];
            for (int i = decimals - 1; i >= 0; i--) {
                p[i] = (char)('0' + fraction % 10);
                fraction /= 10;
            }
            return p + decimals;
        }
    }
    return p + snprintf(p, 64, "%.*f", decimals, x);
}

typedef struct {
    Py_ssize_t n;
    const unsigned char *starts, *ends, *ranks;
    PyObject *suffixes; /* tuple of bytes, one per region */
    PyObject *gap;      /* bytes */
    unsigned long mask;
    Py_ssize_t longest; /* the longest suffix, for the line buffer */
} label_table;

/* Regions whose start is <= x (right) or < x (left): bisect_right / bisect_left over starts. */
static Py_ssize_t count_starts(const label_table *t, uint64_t x, int right) {
    Py_ssize_t lo = 0, hi = t->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        uint64_t s = u64(t->starts + 8 * mid);
        if (right ? s <= x : s < x)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* FsMap.label(offset, length) as a line's suffix: the region's bytes, or the gap's; *more as there. */
static PyObject *label_of(const label_table *t, uint64_t offset, uint64_t length, Py_ssize_t *more) {
    uint64_t span = length ? length : 1;
    uint64_t end = offset > UINT64_MAX - span ? UINT64_MAX : offset + span; /* no region starts that far */
    Py_ssize_t i = count_starts(t, offset, 1) - 1;
    *more = 0;
    if (i < 0 || u64(t->ends + 8 * i) <= offset) {
        if (i + 1 >= t->n || u64(t->starts + 8 * (i + 1)) >= end)
            return t->gap;
        i += 1; /* starts in a gap, runs into a region */
    }
    Py_ssize_t last = count_starts(t, end, 0) - 1;
    Py_ssize_t best = i;
    if (last > i) {
        Py_ssize_t stop = last < i + 16 ? last : i + 16;
        for (Py_ssize_t j = i + 1; j <= stop; j++)
            if (t->ranks[j] > t->ranks[best])
                best = j;
        *more = last - i;
    }
    return PyTuple_GET_ITEM(t->suffixes, best);
}

/* 1: a usable table; 0: not one (the caller falls back to Python). */
static int parse_table(PyObject *labels, label_table *t) {
    PyObject *starts, *ends, *ranks, *suffixes, *gap;
    if (!PyTuple_Check(labels) || PyTuple_GET_SIZE(labels) != 6)
        return 0;
    starts = PyTuple_GET_ITEM(labels, 0);
    ends = PyTuple_GET_ITEM(labels, 1);
    ranks = PyTuple_GET_ITEM(labels, 2);
    suffixes = PyTuple_GET_ITEM(labels, 3);
    gap = PyTuple_GET_ITEM(labels, 4);
    if (!PyBytes_Check(starts) || !PyBytes_Check(ends) || !PyBytes_Check(ranks) || !PyTuple_Check(suffixes) ||
        !PyBytes_Check(gap) || !PyLong_Check(PyTuple_GET_ITEM(labels, 5)))
        return 0;
    t->n = PyTuple_GET_SIZE(suffixes);
    if (PyBytes_GET_SIZE(starts) != 8 * t->n || PyBytes_GET_SIZE(ends) != 8 * t->n || PyBytes_GET_SIZE(ranks) != t->n)
        return 0;
    t->starts = (const unsigned char *)PyBytes_AS_STRING(starts);
    t->ends = (const unsigned char *)PyBytes_AS_STRING(ends);
    t->ranks = (const unsigned char *)PyBytes_AS_STRING(ranks);
    t->suffixes = suffixes;
    t->gap = gap;
    t->mask = PyLong_AsUnsignedLong(PyTuple_GET_ITEM(labels, 5));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    t->longest = PyBytes_GET_SIZE(gap);
    for (Py_ssize_t i = 0; i < t->n; i++) {
        PyObject *item = PyTuple_GET_ITEM(suffixes, i);
        if (!PyBytes_Check(item))
            return 0;
        if (PyBytes_GET_SIZE(item) > t->longest)
            t->longest = PyBytes_GET_SIZE(item);
    }
    return 1;
}

static int by_seq(const void *a, const void *b) {
    uint64_t x = ((const entry *)a)->seq, y = ((const entry *)b)->seq;
    return (x > y) - (x < y);
}

static PyObject *format_frame(PyObject *self, PyObject *args) {
    Py_buffer body;
    double start;
    PyObject *names;
    unsigned long long hold;
    PyObject *labels = Py_None;
    if (!PyArg_ParseTuple(args, "y*dO!K|O", &body, &start, &PyTuple_Type, &names, &hold, &labels))
        return NULL;
    label_table table;
    int labelled = 0;
    PyObject *result = NULL;
    entry *entries = NULL;
    PyObject *out = NULL, *held = NULL;
    const unsigned char *data = body.buf;
    const uint16_t probe = 1;
    if (*(const unsigned char *)&probe != 1 || PyTuple_GET_SIZE(names) != NAMES || body.len < 4)
        goto fallback; /* big-endian, or not what writer.py passes */
    if (labels != Py_None) {
        if (!parse_table(labels, &table))
            goto fallback;
        labelled = 1;
    }
    uint32_t count = u32(data + 0);
    if ((Py_ssize_t)count * RECORD_SIZE + 4 != body.len)
        goto fallback; /* inline payloads follow the records */
    const char *name[NAMES];
    Py_ssize_t name_len[NAMES];
    for (int i = 0; i < NAMES; i++) {
        PyObject *item = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) > 32)
            goto fallback;
        name[i] = PyBytes_AS_STRING(item);
        name_len[i] = PyBytes_GET_SIZE(item);
    }
    entries = PyMem_Malloc(sizeof(entry) * (count ? count : 1));
    if (entries == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    long long counts[NAMES] = {0};
    for (uint32_t i = 0; i < count; i++) {
        const unsigned char *rec = data + 4 + (size_t)i * RECORD_SIZE;
        unsigned kind = rec[OFF_KIND];
        uint16_t cmd = u16(rec + OFF_CMD);
        if ((kind != NO_DATA && kind != CRC) || cmd >= NAMES)
            goto fallback;
        double t = f64(rec + OFF_T) - start, latency = f64(rec + OFF_LATENCY);
        if (!isfinite(t) || !isfinite(latency) || fabs(t) > 1e15 || fabs(latency) > 1e15)
            goto fallback; /* not a number, or wider than a line leaves room for: Python writes it */
        if (kind == CRC && u64(rec + OFF_EXTRA) > 0xFFFFFFFFu)
            goto fallback; /* %08x of a wider number: let Python write it */
        entries[i].seq = u64(rec + OFF_SEQ);
        entries[i].rec = rec;
        counts[cmd]++;
    }
    /* Serving threads queue in nearly, not exactly, seq order (as writer.py's batch.sort()). */
    qsort(entries, count, sizeof(entry), by_seq);
    /* The newest records wait for the next frame: entries[0, written) are written now. */
    uint32_t written = count;
    if (count && hold) {
        uint64_t newest = entries[count - 1].seq;
        uint64_t cut = newest > hold ? newest - hold : 0;
        while (written && entries[written - 1].seq > cut)
            written--;
    }
    held = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count - written) * RECORD_SIZE);
    if (held == NULL)
        goto done;
    for (uint32_t i = written; i < count; i++) {
        const unsigned char *rec = entries[i].rec;
        counts[u16(rec + OFF_CMD)]--;
        memcpy(PyBytes_AS_STRING(held) + (size_t)(i - written) * RECORD_SIZE, rec, RECORD_SIZE);
    }
    /* A label adds its suffix and at most ,"more":N (N of 20 digits at most). */
    Py_ssize_t line_max = LINE_MAX_BYTES + (labelled ? table.longest + 32 : 0);
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)written * line_max);
    if (out == NULL)
        goto done;
    char *p = PyBytes_AS_STRING(out);
    for (uint32_t i = 0; i < written; i++) {
        const unsigned char *rec = entries[i].rec;
        uint16_t cmd = u16(rec + OFF_CMD);
        p = put(p, "{\"seq\":");
        p = put_u64(p, entries[i].seq);
        p = put(p, ",\"t\":");
        p = put_fixed(p, f64(rec + OFF_T) - start, 6);
        p = put(p, ",\"op\":\"");
        memcpy(p, name[cmd], name_len[cmd]);
        p += name_len[cmd];
        p = put(p, "\",\"flags\":");
        p = put_u64(p, u16(rec + OFF_FLAGS));
        p = put(p, ",\"offset\":");
        p = put_u64(p, u64(rec + OFF_OFFSET));
        p = put(p, ",\"length\":");
        p = put_u64(p, u32(rec + OFF_LENGTH));
        p = put(p, ",\"latency\":");
        p = put_fixed(p, f64(rec + OFF_LATENCY), 9);
        p = put(p, ",\"error\":");
        p = put_u64(p, u32(rec + OFF_ERROR));
        p = put(p, ",\"conn\":");
        p = put_u64(p, u32(rec + OFF_CONN));
        p = put(p, ",\"handle\":");
        p = put_u64(p, u64(rec + OFF_HANDLE));
        if (rec[OFF_KIND] == CRC) {
            p = put(p, ",\"hash\":\"");
            p = put_hex8(p, (uint32_t)u64(rec + OFF_EXTRA));
            *p++ = '"';
        }
        if (labelled && cmd < 8 * sizeof(unsigned long) && (table.mask >> cmd) & 1) {
            Py_ssize_t more;
            PyObject *suffix = label_of(&table, u64(rec + OFF_OFFSET), u32(rec + OFF_LENGTH), &more);
            memcpy(p, PyBytes_AS_STRING(suffix), PyBytes_GET_SIZE(suffix));
            p += PyBytes_GET_SIZE(suffix);
            if (more) {
                p = put(p, ",\"more\":");
                p = put_u64(p, (uint64_t)more);
            }
        }
        p = put(p, "}\n");
    }
    if (_PyBytes_Resize(&out, p - PyBytes_AS_STRING(out)) < 0)
        goto done; /* out is freed and NULL */
    result = Py_BuildValue("(N(LLLLLLLL)N)", out, counts[0], counts[1], counts[2], counts[3], counts[4],
                           counts[5], counts[6], counts[7], held);
    out = held = NULL; /* Py_BuildValue's N took them, or freed them on failure */
    goto done;
fallback:
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(out);
    Py_XDECREF(held);
    PyMem_Free(entries);
    PyBuffer_Release(&body);
    return result;
}

static PyMethodDef methods[] = {
    {"format_frame", format_frame, METH_VARARGS,
     "format_frame(body, start, names, hold[, labels]) -> (lines, counts, held) or None: a frame of reads as JSON"
     " lines, labelled from a map's lookup table"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastlines", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fastlines(void) { return PyModule_Create(&module); }
