/* Reed-Solomon parity through Intel's ISA-L: the same code as zfec's, computed with SIMD.
 *
 * Why: zfec multiplies in GF(2^8) one byte at a time through a table (~2 GB/s). With 2 % loss
 * at 8 targets, its encoding took a quarter of the master's CPU and its decoding a quarter of
 * each target's, on a lab where CPU, not the link, set the pace. ISA-L's ec_encode_data does
 * the same arithmetic with vector shuffles: 25x faster here for the master's 3 symbols of a
 * 128-page block (10 us against 249 us).
 *
 * Same code, not merely the same kind: the caller passes zfec's own coefficients (parity row
 * r, source column j: what zfec's encoder makes of unit vectors, see engine/fec.py), and both
 * libraries work in GF(2^8) modulo x^8+x^4+x^3+x^2+1. So a master with ISA-L and a target
 * with zfec (or the other way round) agree on every byte; tests/test_fec.py checks it.
 *
 *   tables(coefficients, k, rows) -> bytes
 *       ISA-L's expanded multiplication tables (32 bytes per coefficient) for ``rows`` parity
 *       rows of ``k`` coefficients each. Made once per k: encode() picks rows out of them.
 *
 *   encode(tables, k, first_row, count, pages, size) -> [bytes] * count
 *       Parity rows first_row .. first_row+count-1 (0 = the first repair symbol) of the ``k``
 *       pages, each ``size`` bytes (short pages zero-padded by the caller).
 *
 *   recover(coefficients, k, size, block, flags_at, pages_at, parity) -> int
 *       Rebuilds, in place, the source pages of a block that a receiver lacks: ``block`` is a
 *       writable buffer holding k flags at flags_at (non-zero: page present) and k pages of
 *       ``size`` bytes at pages_at; ``parity`` a list of (row, symbol) with at least as many
 *       entries as pages are missing. Returns how many pages it rebuilt.
 *
 * Recovery solves only for what is missing: with m pages lost and m repair symbols, the m x m
 * submatrix of the coefficients is inverted (m is a handful), and one ec_encode_data pass over
 * the k symbols at hand writes the m pages: m*k multiply-adds per byte, as zfec, but vectorised.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <isa-l/erasure_code.h>
#include <string.h>

#define MAX_SYMBOLS 256 /* GF(2^8): source and repair symbols of a block together */
#define API_VERSION 1

static int
get_k(PyObject *obj, int *k)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 1 || v >= MAX_SYMBOLS) {
        PyErr_Format(PyExc_ValueError, "k must be within 1..%d, not %ld", MAX_SYMBOLS - 1, v);
        return -1;
    }
    *k = (int)v;
    return 0;
}

/* --- tables ------------------------------------------------------------------------------ */

static PyObject *
tables(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "tables(coefficients, k, rows)");
        return NULL;
    }
    int k;
    if (get_k(args[1], &k) < 0)
        return NULL;
    long rows = PyLong_AsLong(args[2]);
    if (rows == -1 && PyErr_Occurred())
        return NULL;
    if (rows < 1 || rows > MAX_SYMBOLS - k) {
        PyErr_Format(PyExc_ValueError, "rows must be within 1..%d, not %ld", MAX_SYMBOLS - k,
                     rows);
        return NULL;
    }
    Py_buffer coef;
    if (PyObject_GetBuffer(args[0], &coef, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = NULL;
    if (coef.len < (Py_ssize_t)rows * k) {
        PyErr_SetString(PyExc_ValueError, "fewer coefficients than rows x k");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)32 * k * rows);
    if (out == NULL)
        goto done;
    ec_init_tables(k, (int)rows, (unsigned char *)coef.buf,
                   (unsigned char *)PyBytes_AS_STRING(out));
done:
    PyBuffer_Release(&coef);
    return out;
}

/* --- encode ------------------------------------------------------------------------------ */

static PyObject *
encode(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "encode(tables, k, first_row, count, pages, size)");
        return NULL;
    }
    int k;
    if (get_k(args[1], &k) < 0)
        return NULL;
    long first = PyLong_AsLong(args[2]);
    long count = PyLong_AsLong(args[3]);
    Py_ssize_t size = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (first < 0 || count < 1 || first + count > MAX_SYMBOLS - k || size < 1 ||
        size > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "parity rows or page size out of range");
        return NULL;
    }
    Py_buffer tbl;
    if (PyObject_GetBuffer(args[0], &tbl, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *seq = NULL, *result = NULL;
    Py_buffer views[MAX_SYMBOLS];
    unsigned char *data[MAX_SYMBOLS], *coding[MAX_SYMBOLS];
    Py_ssize_t held = 0;
    if (tbl.len < (Py_ssize_t)32 * k * (first + count)) {
        PyErr_SetString(PyExc_ValueError, "the tables lack these rows");
        goto done;
    }
    seq = PySequence_Fast(args[4], "pages must be a sequence");
    if (seq == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(seq) != k) {
        PyErr_Format(PyExc_ValueError, "%d pages expected", k);
        goto done;
    }
    for (; held < k; held++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, held), &views[held],
                               PyBUF_SIMPLE) < 0)
            goto done;
        if (views[held].len < size) {
            held++;
            PyErr_SetString(PyExc_ValueError, "a page is shorter than the page size");
            goto done;
        }
        data[held] = views[held].buf;
    }
    result = PyList_New(count);
    if (result == NULL)
        goto done;
    for (long r = 0; r < count; r++) {
        PyObject *sym = PyBytes_FromStringAndSize(NULL, size);
        if (sym == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, r, sym);
        coding[r] = (unsigned char *)PyBytes_AS_STRING(sym);
    }
    ec_encode_data((int)size, k, (int)count, (unsigned char *)tbl.buf + (size_t)32 * k * first,
                   data, coding);
done:
    while (held > 0)
        PyBuffer_Release(&views[--held]);
    Py_XDECREF(seq);
    PyBuffer_Release(&tbl);
    return result;
}

/* --- recover ----------------------------------------------------------------------------- */

static PyObject *
recover(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "recover(coefficients, k, size, block, flags_at, pages_at, parity)");
        return NULL;
    }
    int k;
    if (get_k(args[1], &k) < 0)
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(args[2]);
    Py_ssize_t flags_at = PyLong_AsSsize_t(args[4]);
    Py_ssize_t pages_at = PyLong_AsSsize_t(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (size < 1 || size > INT_MAX || flags_at < 0 || pages_at < 0) {
        PyErr_SetString(PyExc_ValueError, "page size or offsets out of range");
        return NULL;
    }
    Py_buffer coef, block;
    if (PyObject_GetBuffer(args[0], &coef, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(args[3], &block, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&coef);
        return NULL;
    }
    PyObject *seq = NULL, *result = NULL;
    Py_buffer views[MAX_SYMBOLS];
    Py_ssize_t held = 0;
    unsigned char *inputs[MAX_SYMBOLS], *outputs[MAX_SYMBOLS];
    int missing[MAX_SYMBOLS], rows[MAX_SYMBOLS];
    int m = 0, n_in = 0;
    unsigned char *tbls = NULL;
    const unsigned char *c = coef.buf;
    unsigned char *b = block.buf;

    if (coef.len < (Py_ssize_t)(MAX_SYMBOLS - k) * k) {
        PyErr_SetString(PyExc_ValueError, "fewer coefficients than (256 - k) x k");
        goto done;
    }
    if (flags_at + k > block.len || pages_at + (Py_ssize_t)k * size > block.len) {
        PyErr_SetString(PyExc_ValueError, "the block buffer is too short");
        goto done;
    }
    for (int i = 0; i < k; i++) {
        if (b[flags_at + i])
            inputs[n_in++] = b + pages_at + (Py_ssize_t)i * size;
        else
            missing[m++] = i;
    }
    if (m == 0) {
        result = PyLong_FromLong(0);
        goto done;
    }
    seq = PySequence_Fast(args[6], "parity must be a sequence of (row, symbol)");
    if (seq == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(seq) < m) {
        PyErr_Format(PyExc_ValueError, "%d pages missing, only %zd repair symbols", m,
                     PySequence_Fast_GET_SIZE(seq));
        goto done;
    }
    for (int r = 0; r < m; r++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, r);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "parity entries are (row, symbol) tuples");
            goto done;
        }
        long row = PyLong_AsLong(PyTuple_GET_ITEM(pair, 0));
        if (row == -1 && PyErr_Occurred())
            goto done;
        if (row < 0 || row >= MAX_SYMBOLS - k) {
            PyErr_Format(PyExc_ValueError, "repair row %ld out of range", row);
            goto done;
        }
        for (int q = 0; q < r; q++) {
            if (rows[q] == row) {
                PyErr_SetString(PyExc_ValueError, "a repair row given twice");
                goto done;
            }
        }
        rows[r] = (int)row;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(pair, 1), &views[held], PyBUF_SIMPLE) < 0)
            goto done;
        if (views[held++].len < size) {
            PyErr_SetString(PyExc_ValueError, "a repair symbol is shorter than the page size");
            goto done;
        }
        inputs[n_in++] = views[held - 1].buf;
    }
    {
        /* A: the coefficients of the missing pages in the repair rows used; its inverse
         * maps (repair symbols minus what the pages at hand contribute) to the lost pages. */
        unsigned char a[MAX_SYMBOLS * MAX_SYMBOLS], inv[MAX_SYMBOLS * MAX_SYMBOLS];
        unsigned char *d = PyMem_Malloc((size_t)m * k);
        if (d == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        for (int r = 0; r < m; r++)
            for (int j = 0; j < m; j++)
                a[r * m + j] = c[rows[r] * k + missing[j]];
        if (gf_invert_matrix(a, inv, m) != 0) {
            PyMem_Free(d);
            PyErr_SetString(PyExc_ValueError, "singular repair matrix (not an MDS code?)");
            goto done;
        }
        /* d (m x k): row i rebuilds missing page i from the inputs, present pages first (in
         * page order), then the m repair symbols. In GF(2^8) minus is plus, so
         *   page_i = sum_r inv[i][r] * (repair_r + sum_j c[r][j] * page_j). */
        for (int i = 0; i < m; i++) {
            int col = 0;
            for (int j = 0, next = 0; j < k; j++) {
                if (next < m && missing[next] == j) {
                    next++;
                    continue;
                }
                unsigned char sum = 0;
                for (int r = 0; r < m; r++)
                    sum ^= gf_mul(inv[i * m + r], c[rows[r] * k + j]);
                d[i * k + col++] = sum;
            }
            for (int r = 0; r < m; r++)
                d[i * k + col++] = inv[i * m + r];
            outputs[i] = b + pages_at + (Py_ssize_t)missing[i] * size;
        }
        tbls = PyMem_Malloc((size_t)32 * k * m);
        if (tbls == NULL) {
            PyMem_Free(d);
            PyErr_NoMemory();
            goto done;
        }
        ec_init_tables(k, m, d, tbls);
        PyMem_Free(d);
        ec_encode_data((int)size, k, m, tbls, inputs, outputs);
        for (int i = 0; i < m; i++)
            b[flags_at + missing[i]] = 1;
    }
    result = PyLong_FromLong(m);
done:
    PyMem_Free(tbls);
    while (held > 0)
        PyBuffer_Release(&views[--held]);
    Py_XDECREF(seq);
    PyBuffer_Release(&block);
    PyBuffer_Release(&coef);
    return result;
}

static PyMethodDef methods[] = {
    {"tables", (PyCFunction)(void (*)(void))tables, METH_FASTCALL,
     "tables(coefficients, k, rows) -> ISA-L multiplication tables"},
    {"encode", (PyCFunction)(void (*)(void))encode, METH_FASTCALL,
     "encode(tables, k, first_row, count, pages, size) -> repair symbols"},
    {"recover", (PyCFunction)(void (*)(void))recover, METH_FASTCALL,
     "recover(coefficients, k, size, block, flags_at, pages_at, parity) -> pages rebuilt"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_isal_rs",
    "Reed-Solomon parity (zfec's code) computed with ISA-L.", -1, methods,
};

PyMODINIT_FUNC
PyInit__isal_rs(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "API_VERSION", API_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
