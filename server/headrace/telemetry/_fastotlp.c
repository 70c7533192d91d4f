/* OTLP span encoding in C: the Span fields of an ExportTraceServiceRequest's ScopeSpans
 * (field 2, tag and length included, one after the other) for a list of finished spans.
 *
 * Optional: export.py's `OtlpEncoder.span_fields` is the reference and is used where this
 * module was not built; tests/telemetry/test_export.py checks that both give the same bytes.
 * Why it exists: with it the serving process's span sender encodes the spans it ships to the
 * exporter process (about 0.1 us a span) instead of pickling them there (0.3 us) to have
 * them unpickled (0.4 us) and encoded in Python (0.9 us) in the exporter process, all of it
 * on the machine that serves.
 *
 * Only the common span is encoded here: no trace state, events, status message or dropped
 * counts, links without attributes, ints and bools of the usual ranges. Anything else (and
 * any value this code does not recognise) goes to the `span_field` callback, the Python
 * encoder, which also raises for what cannot be encoded. Attribute sets are encoded by the
 * `attributes_of` callback, once per distinct set object per call: spans share prepared
 * sets (a model's, a connection's), so a call of 512 spans makes a few such calls.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Indices of a FinishedSpan (spans.py). */
enum {
    F_NAME, F_TRACE_ID, F_SPAN_ID, F_TRACE_STATE, F_PARENT_ID, F_PARENT_REMOTE, F_KIND,
    F_START, F_END, F_ATTRIBUTES, F_EVENTS, F_LINKS, F_STATUS_CODE, F_STATUS_MESSAGE,
    F_DROPPED_ATTRIBUTES, F_DROPPED_EVENTS, F_DROPPED_LINKS, F_COUNT
};

#define SETS 32 /* distinct attribute sets remembered per call */
#define FLAGS_HAS_IS_REMOTE 0x100u
#define FLAGS_IS_REMOTE 0x200u
#define LINK_SIZE 35 /* a plain Link field: 2 + 33 */
#define SPAN_GUESS 256 /* bytes reserved per span at first */

typedef struct {
    unsigned char *data;
    size_t size, capacity;
    PyObject *bytes; /* the bytes object `data` is the inside of (the result), or NULL */
} Buffer;

static int
reserve(Buffer *buffer, size_t more)
{
    if (buffer->size + more <= buffer->capacity) {
        return 0;
    }
    size_t capacity = buffer->capacity ? buffer->capacity : 4096;
    while (capacity < buffer->size + more) {
        capacity *= 2;
    }
    if (buffer->bytes != NULL) {
        if (_PyBytes_Resize(&buffer->bytes, (Py_ssize_t)capacity) < 0) {
            buffer->data = NULL; /* the object is gone */
            return -1;
        }
        buffer->data = (unsigned char *)PyBytes_AS_STRING(buffer->bytes);
        buffer->capacity = capacity;
        return 0;
    }
    unsigned char *data = PyMem_Realloc(buffer->data, capacity);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    buffer->data = data;
    buffer->capacity = capacity;
    return 0;
}

static inline unsigned char *
put_varint(unsigned char *out, uint64_t value)
{
    while (value >= 0x80) {
        *out++ = (unsigned char)(value | 0x80);
        value >>= 7;
    }
    *out++ = (unsigned char)value;
    return out;
}

static inline size_t
varint_size(uint64_t value)
{
    size_t size = 1;
    while (value >= 0x80) {
        value >>= 7;
        size++;
    }
    return size;
}

/* Fixed-width fields (ids big-endian, times and flags little-endian) as one store where the
 * compiler knows how (a byte loop was a sixth of the sender's instructions). */
static inline unsigned char *
put_big64(unsigned char *out, uint64_t value)
{
#if (defined(__GNUC__) || defined(__clang__)) && PY_LITTLE_ENDIAN
    value = __builtin_bswap64(value);
    memcpy(out, &value, 8);
    return out + 8;
#else
    for (int shift = 56; shift >= 0; shift -= 8) {
        *out++ = (unsigned char)(value >> shift);
    }
    return out;
#endif
}

static inline unsigned char *
put_little(unsigned char *out, uint64_t value, int bytes)
{
#if PY_LITTLE_ENDIAN
    if (bytes == 8) {
        memcpy(out, &value, 8);
        return out + 8;
    }
    if (bytes == 4) {
        uint32_t word = (uint32_t)value;
        memcpy(out, &word, 4);
        return out + 4;
    }
#endif
    for (int index = 0; index < bytes; index++) {
        *out++ = (unsigned char)(value >> (8 * index));
    }
    return out;
}

#if PY_VERSION_HEX < 0x030C0000
/* An exact int's value read from its digits (CPython 3.11's layout: the sign and count of
 * digits in ob_size, PyLong_SHIFT bits a digit, least significant first) into `words`
 * 64-bit words, least significant first: 1, or 0 where it is negative or does not fit.
 * (`PyLong_AsUnsignedLongLong` and `_PyLong_AsByteArray` go byte by byte through a
 * generic conversion: a quarter of the sender's work here for six ints a span.) */
static inline int
unsigned_words(PyObject *object, uint64_t *out, int words)
{
    Py_ssize_t size = Py_SIZE(object);
    if (size < 0) {
        return 0;
    }
    const digit *digits = ((PyLongObject *)object)->ob_digit;
#if PyLong_SHIFT == 30
    /* The usual shapes straight (ints are normalized: no leading zero digit): a time or a
     * span id in up to 3 digits, a trace id in 5. */
    if (words == 1 && size <= 3) {
        uint64_t value = 0;
        switch (size) {
        case 3:
            if (digits[2] >> 4) {
                return 0; /* 2**64 or more */
            }
            value = (uint64_t)digits[2] << 60;
            /* fall through */
        case 2:
            value |= (uint64_t)digits[1] << 30;
            /* fall through */
        case 1:
            value |= digits[0];
        }
        out[0] = value;
        return 1;
    }
    if (words == 2 && size == 5) {
        if (digits[4] >> 8) {
            return 0; /* 2**128 or more */
        }
        out[0] = digits[0] | (uint64_t)digits[1] << 30 | (uint64_t)digits[2] << 60;
        out[1] = digits[2] >> 4 | (uint64_t)digits[3] << 26 | (uint64_t)digits[4] << 56;
        return 1;
    }
#endif
    for (int word = 0; word < words; word++) {
        out[word] = 0;
    }
    for (Py_ssize_t index = 0; index < size; index++) {
        uint64_t value = digits[index];
        size_t bit = (size_t)index * PyLong_SHIFT;
        size_t word = bit / 64, offset = bit % 64;
        if (word >= (size_t)words) {
            if (value) {
                return 0;  /* too big */
            }
            continue;
        }
        out[word] |= value << offset;
        if (offset + PyLong_SHIFT > 64) {
            uint64_t spill = value >> (64 - offset);
            if (word + 1 < (size_t)words) {
                out[word + 1] |= spill;
            }
            else if (spill) {
                return 0;
            }
        }
    }
    return 1;
}
#endif

/* An exact int in [0, 2**64) into *value; 0 (no error set) for anything else. */
static int
as_u64(PyObject *object, uint64_t *value)
{
    if (!PyLong_CheckExact(object)) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    return unsigned_words(object, value, 1);
#else
    unsigned long long converted = PyLong_AsUnsignedLongLong(object);
    if (converted == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *value = converted;
    return 1;
#endif
}

/* An exact int in [0, 2**128) as 16 big-endian bytes; 0 (no error set) for anything else. */
static int
as_id128(PyObject *object, unsigned char *out)
{
    if (!PyLong_CheckExact(object)) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    uint64_t words[2];
    if (!unsigned_words(object, words, 2)) {
        return 0;
    }
    put_big64(put_big64(out, words[1]), words[0]);
    return 1;
#else
    int failed;
#if PY_VERSION_HEX >= 0x030D0000
    failed = _PyLong_AsByteArray((PyLongObject *)object, out, 16, 0, 0, 1);
#else
    failed = _PyLong_AsByteArray((PyLongObject *)object, out, 16, 0, 0);
#endif
    if (failed) {
        PyErr_Clear();
        return 0;
    }
    return 1;
#endif
}

/* True and False only: 1 or 0; -1 for anything else. */
static inline int
as_flag(PyObject *object)
{
    return object == Py_True ? 1 : object == Py_False ? 0 : -1;
}

/* None, "", or an empty list, tuple or dict: what the common span has there. */
static inline int
is_empty(PyObject *object)
{
    if (object == Py_None) {
        return 1;
    }
    if (PyUnicode_CheckExact(object)) {
        return PyUnicode_GET_LENGTH(object) == 0;
    }
    if (PyList_CheckExact(object) || PyTuple_CheckExact(object)) {
        return Py_SIZE(object) == 0;
    }
    if (PyDict_CheckExact(object)) {
        return PyDict_GET_SIZE(object) == 0;
    }
    return 0;
}

/* The int 0 (not False, not 0.0): what the common span's dropped counts are. */
static inline int
is_zero(PyObject *object)
{
    if (!PyLong_CheckExact(object)) {
        return 0;
    }
#if PY_VERSION_HEX < 0x030C0000
    return Py_SIZE(object) == 0; /* no digits: 0 (3.11's layout, as unsigned_words) */
#else
    long value = PyLong_AsLong(object);
    if (value == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    return value == 0;
#endif
}

/* callback(argument), which must return bytes (a new reference), NULL on error. */
static PyObject *
call_for_bytes(PyObject *callback, PyObject *argument, const char *name)
{
    PyObject *result = PyObject_CallOneArg(callback, argument);
    if (result != NULL && !PyBytes_Check(result)) {
        PyErr_Format(PyExc_TypeError, "%s returned %.100s, not bytes", name,
                     Py_TYPE(result)->tp_name);
        Py_CLEAR(result);
    }
    return result;
}

typedef struct {
    PyObject *attributes_of;
    PyObject *keys[SETS]; /* strong references: an address is not reused meanwhile */
    PyObject *values[SETS];
    int count;
} Sets;

/* The encoded attribute set (borrowed from the cache or `*owned`), NULL on error. */
static PyObject *
encoded_set(Sets *sets, PyObject *attributes, PyObject **owned)
{
    for (int index = 0; index < sets->count; index++) {
        if (sets->keys[index] == attributes) {
            return sets->values[index];
        }
    }
    PyObject *encoded = call_for_bytes(sets->attributes_of, attributes, "attributes_of");
    if (encoded == NULL) {
        return NULL;
    }
    if (sets->count < SETS) {
        sets->keys[sets->count] = Py_NewRef(attributes);
        sets->values[sets->count] = encoded;
        sets->count++;
        return encoded;
    }
    *owned = encoded;
    return encoded;
}

/* Append `span` if it is a common one: 1 appended, 0 not common (nothing written, no error
 * set), -1 error. Everything is read and checked before the one callback (`attributes_of`,
 * Python code): nothing of the span is read after it. `links` is scratch space. */
static int
common_span(Buffer *out, PyObject *span, Sets *sets, Buffer *links)
{
    if (!(PyList_CheckExact(span) || PyTuple_CheckExact(span)) || Py_SIZE(span) != F_COUNT) {
        return 0;
    }
    PyObject **field = PySequence_Fast_ITEMS(span);
    if (!is_empty(field[F_TRACE_STATE]) || !is_empty(field[F_EVENTS]) ||
        !is_empty(field[F_STATUS_MESSAGE]) || !is_zero(field[F_DROPPED_ATTRIBUTES]) ||
        !is_zero(field[F_DROPPED_EVENTS]) || !is_zero(field[F_DROPPED_LINKS])) {
        return 0;
    }
    PyObject *name = field[F_NAME];
    if (!PyUnicode_CheckExact(name)) {
        return 0;
    }
    Py_ssize_t name_size;
    const char *name_bytes = PyUnicode_AsUTF8AndSize(name, &name_size);
    if (name_bytes == NULL) {
        PyErr_Clear(); /* not UTF-8 (a lone surrogate): the Python encoder says so */
        return 0;
    }
    unsigned char trace_id[16];
    uint64_t span_id, parent_id, kind, start_ns, end_ns, status_code;
    int remote = as_flag(field[F_PARENT_REMOTE]);
    if (!as_id128(field[F_TRACE_ID], trace_id) || !as_u64(field[F_SPAN_ID], &span_id) ||
        !as_u64(field[F_PARENT_ID], &parent_id) || remote < 0 ||
        !as_u64(field[F_KIND], &kind) || kind > 0x7E || !as_u64(field[F_START], &start_ns) ||
        !as_u64(field[F_END], &end_ns) || !as_u64(field[F_STATUS_CODE], &status_code) ||
        status_code > 2) {
        return 0;
    }
    /* Span field 13, each link of a trace id, a span id and flags (no attributes). */
    links->size = 0;
    PyObject *link_list = field[F_LINKS];
    if (link_list != Py_None) {
        if (!(PyList_CheckExact(link_list) || PyTuple_CheckExact(link_list))) {
            return 0;
        }
        Py_ssize_t count = Py_SIZE(link_list);
        if (reserve(links, (size_t)count * LINK_SIZE) < 0) {
            return -1;
        }
        unsigned char *at = links->data;
        for (Py_ssize_t index = 0; index < count; index++) {
            PyObject *item = PySequence_Fast_ITEMS(link_list)[index];
            if (!(PyTuple_CheckExact(item) || PyList_CheckExact(item)) || Py_SIZE(item) != 5) {
                return 0;
            }
            PyObject **parts = PySequence_Fast_ITEMS(item);
            uint64_t link_span;
            int link_remote = as_flag(parts[2]);
            at[0] = 0x6A;
            at[1] = 0x21;
            at[2] = 0x0A;
            at[3] = 0x10;
            if (!as_id128(parts[0], at + 4) || !as_u64(parts[1], &link_span) ||
                link_remote < 0 || !is_empty(parts[3]) || !is_zero(parts[4])) {
                return 0;
            }
            at += 20;
            *at++ = 0x12;
            *at++ = 0x08;
            at = put_big64(at, link_span);
            *at++ = 0x35;
            at = put_little(at, FLAGS_HAS_IS_REMOTE | (link_remote ? FLAGS_IS_REMOTE : 0), 4);
        }
        links->size = (size_t)(at - links->data);
    }
    /* Common: from here on, a failure is an error. */
    PyObject *attributes = field[F_ATTRIBUTES], *owned = NULL;
    const char *attribute_bytes = "";
    Py_ssize_t attribute_size = 0;
    Py_INCREF(name); /* name_bytes is its own */
    if (!is_empty(attributes)) {
        PyObject *encoded = encoded_set(sets, attributes, &owned);
        if (encoded == NULL) {
            Py_DECREF(name);
            return -1;
        }
        attribute_bytes = PyBytes_AS_STRING(encoded);
        attribute_size = PyBytes_GET_SIZE(encoded);
    }
    /* Span fields in number order: 1 trace id, 2 span id, 4 parent, 5 name, 6 kind, 7 and
     * 8 times, 9 attributes, 13 links, 15 status, 16 flags. */
    size_t status_size = status_code ? 4 : 2;
    size_t length = 18 + 10 + (parent_id ? 10 : 0) + 1 + varint_size((uint64_t)name_size) +
                    (size_t)name_size + 2 + 18 + (size_t)attribute_size + links->size +
                    status_size + 6;
    if (reserve(out, 1 + varint_size(length) + length) < 0) {
        Py_XDECREF(owned);
        Py_DECREF(name);
        return -1;
    }
    unsigned char *at = out->data + out->size;
    *at++ = 0x12; /* ScopeSpans field 2 */
    at = put_varint(at, length);
    *at++ = 0x0A;
    *at++ = 0x10;
    memcpy(at, trace_id, 16);
    at += 16;
    *at++ = 0x12;
    *at++ = 0x08;
    at = put_big64(at, span_id);
    if (parent_id) {
        *at++ = 0x22;
        *at++ = 0x08;
        at = put_big64(at, parent_id);
    }
    *at++ = 0x2A;
    at = put_varint(at, (uint64_t)name_size);
    memcpy(at, name_bytes, (size_t)name_size);
    at += name_size;
    Py_DECREF(name);
    *at++ = 0x30;
    *at++ = (unsigned char)(kind + 1); /* OTLP's SpanKind counts from UNSPECIFIED */
    *at++ = 0x39;
    at = put_little(at, start_ns, 8);
    *at++ = 0x41;
    at = put_little(at, end_ns, 8);
    memcpy(at, attribute_bytes, (size_t)attribute_size);
    at += attribute_size;
    Py_XDECREF(owned);
    if (links->size) {
        memcpy(at, links->data, links->size);
        at += links->size;
    }
    *at++ = 0x7A;
    if (status_code) {
        *at++ = 0x02;
        *at++ = 0x18;
        *at++ = (unsigned char)status_code;
    }
    else {
        *at++ = 0x00;
    }
    *at++ = 0x85;
    *at++ = 0x01;
    at = put_little(at, FLAGS_HAS_IS_REMOTE | (remote ? FLAGS_IS_REMOTE : 0), 4);
    out->size = (size_t)(at - out->data);
    return 1;
}

static PyObject *
span_fields(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 && nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "span_fields(spans, attributes_of, span_field, "
                                         "head=b'') takes 3 or 4 arguments");
        return NULL;
    }
    PyObject *attributes_of = args[1], *span_field = args[2];
    if (!PyCallable_Check(attributes_of) || !PyCallable_Check(span_field)) {
        PyErr_SetString(PyExc_TypeError, "attributes_of and span_field must be callable");
        return NULL;
    }
    PyObject *head = nargs == 4 ? args[3] : NULL;
    if (head != NULL && !PyBytes_CheckExact(head)) {
        PyErr_SetString(PyExc_TypeError, "head must be bytes");
        return NULL;
    }
    size_t head_size = head != NULL ? (size_t)PyBytes_GET_SIZE(head) : 0;
    /* A snapshot: the spans stay alive, and in place, whatever the callbacks do. */
    PyObject *spans = PySequence_Tuple(args[0]);
    if (spans == NULL) {
        return NULL;
    }
    Sets sets = {.attributes_of = attributes_of, .count = 0};
    Buffer out = {NULL, 0, 0, NULL}, links = {NULL, 0, 0, NULL};
    PyObject *result = NULL;
    Py_ssize_t count = PyTuple_GET_SIZE(spans);
    /* Written straight into the result, `head` first (a common span: 150-250 bytes): no
     * copy of a chunk's hundred kilobytes afterwards. Never empty: the empty bytes object
     * is shared, and this one is resized. */
    out.capacity = head_size + (size_t)count * SPAN_GUESS + 1;
    out.bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)out.capacity);
    if (out.bytes == NULL) {
        goto finally;
    }
    out.data = (unsigned char *)PyBytes_AS_STRING(out.bytes);
    if (head_size) {
        memcpy(out.data, PyBytes_AS_STRING(head), head_size);
        out.size = head_size;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyObject *span = PyTuple_GET_ITEM(spans, index);
        int done = common_span(&out, span, &sets, &links);
        if (done < 0) {
            goto finally;
        }
        if (done) {
            continue;
        }
        PyObject *encoded = call_for_bytes(span_field, span, "span_field");
        if (encoded == NULL) {
            goto finally;
        }
        size_t size = (size_t)PyBytes_GET_SIZE(encoded);
        if (reserve(&out, size) < 0) {
            Py_DECREF(encoded);
            goto finally;
        }
        memcpy(out.data + out.size, PyBytes_AS_STRING(encoded), size);
        out.size += size;
        Py_DECREF(encoded);
    }
    if (_PyBytes_Resize(&out.bytes, (Py_ssize_t)out.size) == 0) {
        result = out.bytes; /* its length now the bytes written */
        out.bytes = NULL;
    }
finally:
    for (int index = 0; index < sets.count; index++) {
        Py_DECREF(sets.keys[index]);
        Py_DECREF(sets.values[index]);
    }
    Py_XDECREF(out.bytes);
    PyMem_Free(links.data);
    Py_DECREF(spans);
    return result;
}

static PyMethodDef module_methods[] = {
    {"span_fields", (PyCFunction)(void (*)(void))span_fields, METH_FASTCALL,
     "span_fields(spans, attributes_of, span_field, head=b'') -> bytes: `head`, then the "
     "ScopeSpans Span fields of `spans` (export.py's OtlpEncoder.span_fields)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "headrace.telemetry._fastotlp",
    .m_doc = "OTLP span encoding in C (optional; see export.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastotlp(void)
{
    return PyModule_Create(&module_definition);
}
