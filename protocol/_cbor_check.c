/* Is this byte string one CBOR item in the contract's deterministic form? A check, not a decoder.
 *
 * Why this exists (protocol/cbor.py, docs/performance.md): the server decodes every event payload in
 * the deterministic form. cbor2 decodes quickly but accepts other encodings too, and re-encoding its
 * result canonically to compare bytes cost 12 µs of a collector's ~60 µs of Python per event. This
 * walk over the bytes answers the same question in well under a microsecond, without building any
 * object. It only ever says "yes, deterministic and
 * inside the subset cbor2 then decodes to exactly what the strict decoder would return" or "not
 * sure"; on "not sure" the strict Python decoder decides and explains, so this code never has to.
 *
 * "Yes" requires (RFC 8949 §4.2.1 and protocol/cbor.py): definite lengths only; every integer, length
 * and tag-free head in its shortest form; floats finite and in the shortest of half, single, double
 * that holds the value exactly; only false, true and null as simple values; map keys integers or text,
 * in strictly increasing bytewise order of their encoding (so no duplicates); no tags; nesting no
 * deeper than max_depth; the item filling the input exactly. Every length is checked against the
 * bytes left before it is used. UTF-8 of text is left to cbor2, which refuses invalid text.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const unsigned char *data;
    Py_ssize_t size;
    Py_ssize_t pos;
    int max_depth;
} reader;

enum { OK = 0, NOT_SURE = -1 };

/* The head of an item: major type, additional information, argument (raw bits for floats). */
static int head(reader *r, int *major, int *info, uint64_t *arg) {
    if (r->pos >= r->size) {
        return NOT_SURE;
    }
    unsigned char initial = r->data[r->pos++];
    *major = initial >> 5;
    *info = initial & 0x1f;
    if (*info < 24) {
        *arg = (uint64_t)*info;
        return OK;
    }
    if (*info > 27) {
        return NOT_SURE; /* reserved, or an indefinite length (31) */
    }
    Py_ssize_t length = (Py_ssize_t)1 << (*info - 24);
    if (r->size - r->pos < length) {
        return NOT_SURE;
    }
    uint64_t value = 0;
    for (Py_ssize_t i = 0; i < length; i++) {
        value = (value << 8) | r->data[r->pos + i];
    }
    r->pos += length;
    *arg = value;
    return OK;
}

static int shortest_argument(int info, uint64_t arg) {
    switch (info) {
    case 24: return arg >= 24;
    case 25: return arg > 0xff;
    case 26: return arg > 0xffff;
    case 27: return arg > 0xffffffffULL;
    default: return 1; /* in the initial byte itself */
    }
}

/* Whether a finite value is exactly a binary16 (half) value. */
static int fits_half(double value) {
    if (value == 0.0) {
        return 1;
    }
    double magnitude = fabs(value);
    if (magnitude > 65504.0) {
        return 0;
    }
    if (magnitude >= ldexp(1.0, -14)) { /* a normal half: 11 significant bits */
        int exponent;
        frexp(magnitude, &exponent);
        double scaled = ldexp(magnitude, 11 - exponent);
        return scaled == floor(scaled);
    }
    double steps = ldexp(magnitude, 24); /* a subnormal half: a multiple of 2^-24 */
    return steps == floor(steps);
}

static int simple_or_float(int info, uint64_t bits) {
    switch (info) {
    case 20: case 21: case 22: /* false, true, null */
        return OK;
    case 25: /* half: nothing is shorter; finite unless the exponent is all ones */
        return ((bits >> 10) & 0x1f) == 0x1f ? NOT_SURE : OK;
    case 26: {
        uint32_t raw = (uint32_t)bits;
        float single;
        memcpy(&single, &raw, sizeof single);
        if (!isfinite(single) || fits_half((double)single)) {
            return NOT_SURE;
        }
        return OK;
    }
    case 27: {
        double value;
        memcpy(&value, &bits, sizeof value);
        if (!isfinite(value)) {
            return NOT_SURE;
        }
        if (fabs(value) <= FLT_MAX && (double)(float)value == value) {
            return NOT_SURE; /* a single (or a half) holds it exactly */
        }
        return OK;
    }
    default:
        return NOT_SURE; /* undefined, other simple values, a stray break */
    }
}

/* Bytewise order of two encoded keys: -1, 0 or 1. */
static int compare(const unsigned char *a, Py_ssize_t a_size, const unsigned char *b, Py_ssize_t b_size) {
    int c = memcmp(a, b, (size_t)(a_size < b_size ? a_size : b_size));
    if (c != 0) {
        return c < 0 ? -1 : 1;
    }
    return a_size < b_size ? -1 : (a_size > b_size ? 1 : 0);
}

static int item(reader *r, int depth) {
    if (depth > r->max_depth) {
        return NOT_SURE;
    }
    int major, info;
    uint64_t arg;
    if (head(r, &major, &info, &arg) != OK) {
        return NOT_SURE;
    }
    if (major == 7) {
        return simple_or_float(info, arg);
    }
    if (!shortest_argument(info, arg)) {
        return NOT_SURE;
    }
    Py_ssize_t left = r->size - r->pos;
    switch (major) {
    case 0: case 1:
        return OK;
    case 2: case 3:
        if (arg > (uint64_t)left) {
            return NOT_SURE;
        }
        r->pos += (Py_ssize_t)arg;
        return OK;
    case 4:
        if (arg > (uint64_t)left) { /* every item takes at least one byte */
            return NOT_SURE;
        }
        for (uint64_t i = 0; i < arg; i++) {
            if (item(r, depth + 1) != OK) {
                return NOT_SURE;
            }
        }
        return OK;
    case 5: {
        if (arg > (uint64_t)left / 2) { /* every pair takes at least two bytes */
            return NOT_SURE;
        }
        const unsigned char *previous = NULL;
        Py_ssize_t previous_size = 0;
        for (uint64_t i = 0; i < arg; i++) {
            Py_ssize_t key_start = r->pos;
            if (key_start >= r->size) {
                return NOT_SURE;
            }
            int key_major = r->data[key_start] >> 5;
            if (key_major != 0 && key_major != 1 && key_major != 3) {
                return NOT_SURE; /* keys are integers or text */
            }
            if (item(r, depth + 1) != OK) {
                return NOT_SURE;
            }
            const unsigned char *key = r->data + key_start;
            Py_ssize_t key_size = r->pos - key_start;
            if (previous != NULL && compare(previous, previous_size, key, key_size) >= 0) {
                return NOT_SURE; /* out of order, or a duplicate */
            }
            previous = key;
            previous_size = key_size;
            if (item(r, depth + 1) != OK) {
                return NOT_SURE;
            }
        }
        return OK;
    }
    default:
        return NOT_SURE; /* tags: the strict decoder knows which ones a caller allows */
    }
}

/* deterministic(data: bytes, max_depth: int) -> bool */
static PyObject *deterministic(PyObject *self, PyObject *args) {
    Py_buffer view;
    int max_depth;
    if (!PyArg_ParseTuple(args, "y*i:deterministic", &view, &max_depth)) {
        return NULL;
    }
    reader r = {(const unsigned char *)view.buf, view.len, 0, max_depth};
    int verdict = view.len > 0 && item(&r, 0) == OK && r.pos == r.size;
    PyBuffer_Release(&view);
    return PyBool_FromLong(verdict);
}

static PyMethodDef methods[] = {
    {"deterministic", deterministic, METH_VARARGS,
     "deterministic(data, max_depth) -> bool: one item in the contract's deterministic form, no tags."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "protocol._cbor_check", "Deterministic-form check of CBOR bytes.", -1, methods,
};

PyMODINIT_FUNC PyInit__cbor_check(void) { return PyModule_Create(&module); }
