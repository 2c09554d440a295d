/* One call that checks a whole batch of Ed25519 signatures with the interpreter lock released.
 *
 * Why this exists (docs/performance.md): PyNaCl releases the lock inside each verification, but a
 * thread that verifies one signature per call must take the lock back between two signatures. While
 * the collector's other thread runs Python code, that thread gets the lock back only when the other
 * one is forced off it (every 5 ms), so a verifier thread beside a busy one managed ~350 checks/s
 * instead of ~14,000. Here the loop itself runs without the lock: two handovers per batch.
 *
 * The arithmetic is libsodium's own crypto_sign_verify_detached, the very function PyNaCl's verify
 * ends in, taken from the libsodium PyNaCl loaded (its address is passed in by server/batch_verify.py),
 * so both paths accept exactly the same signatures. Nothing here parses or trusts input beyond
 * lengths: a key that is not 32 bytes or a signature that is not 64 bytes is simply "does not verify".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>

typedef int (*verify_detached_fn)(const unsigned char *sig, const unsigned char *m, unsigned long long mlen,
                                  const unsigned char *pk);

typedef struct {
    const unsigned char *key;
    const unsigned char *message;
    Py_ssize_t message_length;
    const unsigned char *signature;
    char usable; /* the lengths are right: worth checking at all */
} job;

/* verify_all(address, jobs) -> bytes: one byte per job, 1 where the signature verifies, else 0.
 * jobs: a sequence of (key: bytes, message: bytes, signature: bytes). */
static PyObject *verify_all(PyObject *self, PyObject *args) {
    unsigned long long address;
    PyObject *given;
    if (!PyArg_ParseTuple(args, "KO:verify_all", &address, &given)) {
        return NULL;
    }
    if (address == 0) {
        PyErr_SetString(PyExc_ValueError, "verify_all: no verification function");
        return NULL;
    }
    /* A tuple of the jobs: it holds a reference to every (immutable) item while the lock is released,
     * whatever other threads do to the caller's list meanwhile. */
    PyObject *jobs_tuple = PySequence_Tuple(given);
    if (jobs_tuple == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(jobs_tuple);
    job *jobs = PyMem_RawCalloc(n > 0 ? (size_t)n : 1, sizeof(job));
    PyObject *result = PyBytes_FromStringAndSize(NULL, n);
    if (jobs == NULL || result == NULL) {
        PyMem_RawFree(jobs);
        Py_XDECREF(result);
        Py_DECREF(jobs_tuple);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(jobs_tuple, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(item, 0)) ||
            !PyBytes_Check(PyTuple_GET_ITEM(item, 1)) || !PyBytes_Check(PyTuple_GET_ITEM(item, 2))) {
            PyErr_Format(PyExc_TypeError, "verify_all: job %zd must be a tuple (key, message, signature) of bytes", i);
            PyMem_RawFree(jobs);
            Py_DECREF(result);
            Py_DECREF(jobs_tuple);
            return NULL;
        }
        PyObject *key = PyTuple_GET_ITEM(item, 0);
        PyObject *message = PyTuple_GET_ITEM(item, 1);
        PyObject *signature = PyTuple_GET_ITEM(item, 2);
        jobs[i].key = (const unsigned char *)PyBytes_AS_STRING(key);
        jobs[i].message = (const unsigned char *)PyBytes_AS_STRING(message);
        jobs[i].message_length = PyBytes_GET_SIZE(message);
        jobs[i].signature = (const unsigned char *)PyBytes_AS_STRING(signature);
        jobs[i].usable = PyBytes_GET_SIZE(key) == 32 && PyBytes_GET_SIZE(signature) == 64;
    }
    verify_detached_fn verify = (verify_detached_fn)(uintptr_t)address;
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        out[i] = jobs[i].usable &&
                 verify(jobs[i].signature, jobs[i].message, (unsigned long long)jobs[i].message_length, jobs[i].key) == 0;
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(jobs);
    Py_DECREF(jobs_tuple);
    return result;
}

static PyMethodDef methods[] = {
    {"verify_all", verify_all, METH_VARARGS,
     "verify_all(address, jobs) -> bytes: 1 per (key, message, signature) that verifies, else 0."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "server._ed25519_batch", "Ed25519 checks of a batch without the interpreter lock.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__ed25519_batch(void) { return PyModule_Create(&module); }
