/* The lean tracer's per-span hot path in C: starting a span from prepared attributes
 * (`LeanTracer.start_prepared`), starting one as the current span of a context
 * (`LeanTracer.start_current`), ending it (`RecordingSpan.end`), ending a current span
 * (`end_current`), the export queue (`SpanQueue`: record, take), its ids (`_Ids`), and the
 * server interceptor's span start and finish (`ServerSpans`: interceptor.py's `_starter`
 * and `_finish`).
 *
 * Optional: spans.py uses this module when it was built and imports, else its own Python
 * code, which defines the behaviour; tests/telemetry/test_fastspans.py checks that both give
 * the same spans, records and sampling decisions. Why it exists: in Python these two steps
 * are about 11k instructions a span (bytecode, a frame per call), which is most of what
 * tracing every request costs the event loop; here they are a few hundred.
 *
 * A span stays a `RecordingSpan` (a Python class with slots); this code allocates it and
 * fills its slots at the offsets of the class's own slot descriptors, read once by
 * `install`. Its data is the list it records: see `FinishedSpan` in spans.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <time.h>
#include <pthread.h>

/* Indices of a FinishedSpan (spans.py). */
enum {
    F_NAME, F_TRACE_ID, F_SPAN_ID, F_TRACE_STATE, F_PARENT_ID, F_PARENT_REMOTE, F_KIND,
    F_START, F_END, F_ATTRIBUTES, F_EVENTS, F_LINKS, F_STATUS_CODE, F_STATUS_MESSAGE,
    F_DROPPED_ATTRIBUTES, F_DROPPED_EVENTS, F_DROPPED_LINKS, F_COUNT
};

/* What `install` read of RecordingSpan: the class and its slots' offsets. */
static PyTypeObject *span_type = NULL;
static Py_ssize_t off_data = -1, off_context = -1, off_tracer = -1, off_shared = -1;
static Py_ssize_t off_record = -1;
static PyObject *str_value = NULL;      /* "_value_" */
static PyObject *str_to_header = NULL;  /* "to_header" */
static PyObject *str_record = NULL;     /* "_record" */
static PyObject *str_ended = NULL;      /* "_ended" */
static PyObject *str_ending = NULL;     /* "ending" */
static PyObject *str_end = NULL;       /* "end" */
static PyObject *str_set_prepared = NULL;  /* "_set_prepared_attribute" */
static PyObject *empty_string = NULL;
static PyObject *zero = NULL;

/* What `configure` was given: OpenTelemetry's current-context variable, the key of the
 * current span in a context, the Context class, and the Python steps the C ones hand the
 * rare cases to (spans.py: parent_of, _end_failed, detach_context). NULL until then. */
static PyObject *context_variable = NULL;
static PyObject *span_key = NULL;
static PyObject *context_type = NULL;
static PyObject *py_parent_of = NULL;
static PyObject *py_end_failed = NULL;
static PyObject *py_detach = NULL;
static PyTypeObject *non_recording_type = NULL;  /* opentelemetry.trace.NonRecordingSpan */
static int plain_context = 0;  /* context_type makes its instances as dict does */
static PyObject *empty_tuple = NULL;
static PyObject *str_context = NULL;  /* "_context": where NonRecordingSpan keeps its context */

#define SLOT(object, offset) (*(PyObject **)((char *)(object) + (offset)))

static PyObject *
now_ns(void)
{
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    return PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
}

/* ---- Starter: one tracer's start_prepared ------------------------------------------ */

#define KINDS 8  /* SpanKind values remembered (the API has five) */

#define ID_WORDS 64  /* spans.py's ID_WORDS: 64-bit words drawn at a time */

/* Forks of this process so far (counted in the child): words drawn before a fork are not
 * used after it, where the parent uses them too. */
static unsigned long forks = 0;

static void
count_fork(void)
{
    forks++;
}

typedef struct {
    PyObject_HEAD
    PyObject *tracer;          /* the LeanTracer: each span's `_tracer` */
    PyObject *record;          /* its `_record`, read once: each span's `_record` */
    PyObject *random_bytes;    /* random_bytes(n) -> n bytes: os.urandom, or a test's */
    PyObject *non_recording;   /* (trace_id, span_id, flags_index, state) -> NonRecordingSpan */
    PyObject *flags;           /* TraceFlags by value, 0-3 (a list) */
    PyObject *no_state;        /* the empty TraceState every default SpanContext holds */
    PyObject *block_size;      /* ID_WORDS * 8: random_bytes' argument for a block of ids */
    PyObject *kinds[KINDS];    /* the SpanKinds started so far, and their values */
    PyObject *kind_values[KINDS];
    int kind_count;
    PyObject *no_attributes;   /* the shared empty attributes of a link (record_prepared) */
    PyObject *internal;        /* SpanKind.INTERNAL's value */
    int links;                 /* the span limits allow links (max_links is not 0) */
    uint64_t bound;            /* the sampler's: low 64 bits of a new trace id below it */
    int sample_all;            /* the bound is 2**64 or more (ratio 1.0): every new trace */
    int words_left;            /* of `words`, not yet used (taken from the front) */
    unsigned long forks;       /* `forks` when the words were drawn */
    uint64_t words[ID_WORDS];  /* random words for ids: spans.py's `_Ids` */
} Starter;

static int
starter_traverse(Starter *self, visitproc visit, void *arg)
{
    Py_VISIT(self->tracer);
    Py_VISIT(self->record);
    Py_VISIT(self->random_bytes);
    Py_VISIT(self->non_recording);
    Py_VISIT(self->flags);
    Py_VISIT(self->no_state);
    for (int index = 0; index < self->kind_count; index++) {
        Py_VISIT(self->kinds[index]);
        Py_VISIT(self->kind_values[index]);
    }
    Py_VISIT(self->no_attributes);
    Py_VISIT(self->internal);
    return 0;
}

static int
starter_clear(Starter *self)
{
    Py_CLEAR(self->tracer);
    Py_CLEAR(self->record);
    Py_CLEAR(self->random_bytes);
    Py_CLEAR(self->non_recording);
    Py_CLEAR(self->flags);
    Py_CLEAR(self->no_state);
    Py_CLEAR(self->block_size);
    for (int index = 0; index < self->kind_count; index++) {
        Py_CLEAR(self->kinds[index]);
        Py_CLEAR(self->kind_values[index]);
    }
    self->kind_count = 0;
    Py_CLEAR(self->no_attributes);
    Py_CLEAR(self->internal);
    return 0;
}

static void
starter_dealloc(Starter *self)
{
    PyObject_GC_UnTrack(self);
    starter_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
starter_init(Starter *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"tracer", "random_bytes", "non_recording", "flags", "no_state",
                            "bound", "no_attributes", "internal", "links", NULL};
    PyObject *tracer, *random_bytes, *non_recording, *flags, *no_state, *bound;
    PyObject *no_attributes, *internal;
    int links;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO!OO!O!O!p", names, &tracer,
                                     &random_bytes, &non_recording, &PyList_Type, &flags,
                                     &no_state, &PyLong_Type, &bound, &PyDict_Type,
                                     &no_attributes, &PyLong_Type, &internal, &links)) {
        return -1;
    }
    int sample_all = 0;
    unsigned long long low_bound = 0;
    if (PyObject_RichCompareBool(bound, zero, Py_LT) == 1) {
        PyErr_SetString(PyExc_ValueError, "bound: 0 to 2**64");
        return -1;
    }
    low_bound = PyLong_AsUnsignedLongLong(bound);
    if (low_bound == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        sample_all = 1;
    }
    if (PyList_GET_SIZE(flags) != 4) {
        PyErr_SetString(PyExc_ValueError, "flags: the 4 TraceFlags values");
        return -1;
    }
    if (span_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "install(RecordingSpan) was not called");
        return -1;
    }
    PyObject *record = PyObject_GetAttr(tracer, str_record);
    if (record == NULL) {
        return -1;
    }
    starter_clear(self);
    self->tracer = Py_NewRef(tracer);
    self->record = record;
    self->random_bytes = Py_NewRef(random_bytes);
    self->no_attributes = Py_NewRef(no_attributes);
    self->internal = Py_NewRef(internal);
    self->links = links;
    self->non_recording = Py_NewRef(non_recording);
    self->flags = Py_NewRef(flags);
    self->no_state = Py_NewRef(no_state);
    self->block_size = PyLong_FromLong(ID_WORDS * 8);
    if (self->block_size == NULL) {
        return -1;
    }
    self->words_left = 0;
    self->bound = low_bound;
    self->sample_all = sample_all;
    return 0;
}

/* The next random word (spans.py's `_Ids._word`): words come ID_WORDS at a time, as
 * random_bytes(ID_WORDS * 8) read as little-endian 64-bit words in order. */
static int
next_word(Starter *self, uint64_t *word)
{
    if (self->words_left == 0 || self->forks != forks) {
        PyObject *raw = PyObject_CallOneArg(self->random_bytes, self->block_size);
        if (raw == NULL) {
            return -1;
        }
        if (!PyBytes_Check(raw) || PyBytes_GET_SIZE(raw) != ID_WORDS * 8) {
            Py_DECREF(raw);
            PyErr_Format(PyExc_ValueError, "random_bytes(%d) gave something else",
                         ID_WORDS * 8);
            return -1;
        }
        const unsigned char *bytes = (const unsigned char *)PyBytes_AS_STRING(raw);
        for (int index = 0; index < ID_WORDS; index++) {
            uint64_t value = 0;
            for (int byte = 7; byte >= 0; byte--) {
                value = (value << 8) | bytes[index * 8 + byte];
            }
            self->words[index] = value;
        }
        Py_DECREF(raw);
        self->words_left = ID_WORDS;
        self->forks = forks;
    }
    *word = self->words[ID_WORDS - self->words_left];
    self->words_left--;
    return 0;
}

/* A new span id (`_Ids.span_id`): a word, 1 where it is 0 (the SDK's ids are never 0). */
static PyObject *
new_span_id(Starter *self)
{
    uint64_t word;
    if (next_word(self, &word) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(word ? word : 1);
}

/* A new trace id (`_Ids.trace_id`): two words, the high then the low 64 bits (1 where both
 * are 0); `*low` is set to the low ones (what the sampler reads). */
static PyObject *
new_trace_id(Starter *self, uint64_t *low)
{
    uint64_t high;
    if (next_word(self, &high) < 0 || next_word(self, low) < 0) {
        return NULL;
    }
    if (high == 0) {
        if (*low == 0) {
            *low = 1;
        }
        return PyLong_FromUnsignedLongLong(*low);
    }
    unsigned char bytes[16];
    for (int byte = 0; byte < 8; byte++) {
        bytes[byte] = (unsigned char)(*low >> (8 * byte));
        bytes[8 + byte] = (unsigned char)(high >> (8 * byte));
    }
    return _PyLong_FromByteArray(bytes, 16, 1, 0);
}

/* span_id(): a new span id, for spans recorded whole (LeanTracer.record_span). */
static PyObject *
starter_span_id(Starter *self, PyObject *unused)
{
    return new_span_id(self);
}

/* A new RecordingSpan holding `data` and `context` (both stolen). */
static PyObject *
new_span(Starter *self, PyObject *data, PyObject *context, int shared)
{
    PyObject *span = span_type->tp_alloc(span_type, 0);
    if (span == NULL) {
        Py_DECREF(data);
        Py_DECREF(context);
        return NULL;
    }
    SLOT(span, off_data) = data;
    SLOT(span, off_context) = context;
    SLOT(span, off_tracer) = Py_NewRef(self->tracer);
    SLOT(span, off_record) = Py_NewRef(self->record);
    SLOT(span, off_shared) = Py_NewRef(shared ? Py_True : Py_False);
    return span;
}

/* start(name, parent, kind, attributes, start_time=None, shared=True): what
 * LeanTracer.start_prepared does (see there). */
static PyObject *
starter_start(Starter *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *start_time = Py_None;
    int shared = 1;
    Py_ssize_t positional = PyVectorcall_NARGS(nargs);
    Py_ssize_t keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (positional < 4 || positional > 6) {
        PyErr_Format(PyExc_TypeError, "start_prepared takes 4 to 6 arguments (%zd given)",
                     positional);
        return NULL;
    }
    if (positional >= 5) {
        start_time = args[4];
    }
    if (positional == 6 && (shared = PyObject_IsTrue(args[5])) < 0) {
        return NULL;
    }
    for (Py_ssize_t index = 0; index < keywords; index++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, index);
        PyObject *value = args[positional + index];
        if (PyUnicode_CompareWithASCIIString(key, "start_time") == 0) {
            start_time = value;
        }
        else if (PyUnicode_CompareWithASCIIString(key, "shared") == 0) {
            if ((shared = PyObject_IsTrue(value)) < 0) {
                return NULL;
            }
        }
        else {
            PyErr_Format(PyExc_TypeError, "start_prepared got an unexpected keyword %R", key);
            return NULL;
        }
    }
    PyObject *name = args[0], *parent = args[1], *kind = args[2], *prepared = args[3];
    if (!PyTuple_Check(prepared) || PyTuple_GET_SIZE(prepared) != 2) {
        PyErr_SetString(PyExc_TypeError, "attributes: (dict, dropped) from prepare()");
        return NULL;
    }
    int has_parent = 0;
    if (parent != Py_None) {
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 6) {
            PyErr_SetString(PyExc_TypeError, "parent: a span context (6-tuple) or None");
            return NULL;
        }
        if ((has_parent = PyObject_IsTrue(PyTuple_GET_ITEM(parent, 5))) < 0) {
            return NULL;
        }
    }

    PyObject *span_id = new_span_id(self);
    if (span_id == NULL) {
        return NULL;
    }
    PyObject *trace_id, *state, *header, *parent_id, *parent_remote, *context_flags;
    if (has_parent) {
        trace_id = PyTuple_GET_ITEM(parent, 0);
        state = PyTuple_GET_ITEM(parent, 4);
        long flags = PyLong_AsLong(PyTuple_GET_ITEM(parent, 3));
        if (flags == -1 && PyErr_Occurred()) {
            Py_DECREF(span_id);
            return NULL;
        }
        if (!(flags & 1)) {  /* the parent is not sampled: neither is this span */
            PyObject *result = PyObject_CallFunction(self->non_recording, "OOlO", trace_id,
                                                     span_id, flags & 2, state);
            Py_DECREF(span_id);
            return result;
        }
        Py_INCREF(trace_id);
        header = state == self->no_state ? Py_NewRef(empty_string)
                                         : PyObject_CallMethodNoArgs(state, str_to_header);
        if (header == NULL) {
            Py_DECREF(trace_id);
            Py_DECREF(span_id);
            return NULL;
        }
        parent_id = Py_NewRef(PyTuple_GET_ITEM(parent, 1));
        parent_remote = Py_NewRef(PyTuple_GET_ITEM(parent, 2));
        context_flags = PyList_GET_ITEM(self->flags, (flags & 2) | 1);
    }
    else {
        uint64_t low;
        trace_id = new_trace_id(self, &low);
        if (trace_id == NULL) {
            Py_DECREF(span_id);
            return NULL;
        }
        state = self->no_state;
        if (!self->sample_all && low >= self->bound) {  /* a new trace the sampler leaves out */
            PyObject *result = PyObject_CallFunction(self->non_recording, "OOlO", trace_id,
                                                     span_id, 2L, state);
            Py_DECREF(trace_id);
            Py_DECREF(span_id);
            return result;
        }
        header = Py_NewRef(empty_string);
        parent_id = Py_NewRef(zero);
        parent_remote = Py_NewRef(Py_False);
        context_flags = PyList_GET_ITEM(self->flags, 3);
    }
    /* From here the new references are trace_id, span_id, header, parent_id and
     * parent_remote: the data list takes them. */
    PyObject *kind_value = NULL;
    for (int index = 0; index < self->kind_count; index++) {
        if (kind == self->kinds[index]) {  /* an enum member: its value does not change */
            kind_value = Py_NewRef(self->kind_values[index]);
            break;
        }
    }
    if (kind_value == NULL && (kind_value = PyObject_GetAttr(kind, str_value)) != NULL &&
        self->kind_count < KINDS) {
        self->kinds[self->kind_count] = Py_NewRef(kind);
        self->kind_values[self->kind_count] = Py_NewRef(kind_value);
        self->kind_count++;
    }
    PyObject *start = start_time == Py_None ? now_ns() : Py_NewRef(start_time);
    PyObject *data = PyList_New(F_COUNT);
    if (kind_value == NULL || start == NULL || data == NULL) {
        Py_XDECREF(kind_value);
        Py_XDECREF(start);
        Py_XDECREF(data);
        Py_DECREF(trace_id);
        Py_DECREF(span_id);
        Py_DECREF(header);
        Py_DECREF(parent_id);
        Py_DECREF(parent_remote);
        return NULL;
    }
    PyList_SET_ITEM(data, F_NAME, Py_NewRef(name));
    PyList_SET_ITEM(data, F_TRACE_ID, Py_NewRef(trace_id));
    PyList_SET_ITEM(data, F_SPAN_ID, Py_NewRef(span_id));
    PyList_SET_ITEM(data, F_TRACE_STATE, header);
    PyList_SET_ITEM(data, F_PARENT_ID, parent_id);
    PyList_SET_ITEM(data, F_PARENT_REMOTE, parent_remote);
    PyList_SET_ITEM(data, F_KIND, kind_value);
    PyList_SET_ITEM(data, F_START, start);
    PyList_SET_ITEM(data, F_END, Py_NewRef(Py_None));
    PyList_SET_ITEM(data, F_ATTRIBUTES, Py_NewRef(PyTuple_GET_ITEM(prepared, 0)));
    PyList_SET_ITEM(data, F_EVENTS, Py_NewRef(Py_None));
    PyList_SET_ITEM(data, F_LINKS, Py_NewRef(Py_None));
    PyList_SET_ITEM(data, F_STATUS_CODE, Py_NewRef(zero));
    PyList_SET_ITEM(data, F_STATUS_MESSAGE, Py_NewRef(Py_None));
    PyList_SET_ITEM(data, F_DROPPED_ATTRIBUTES, Py_NewRef(PyTuple_GET_ITEM(prepared, 1)));
    PyList_SET_ITEM(data, F_DROPPED_EVENTS, Py_NewRef(zero));
    PyList_SET_ITEM(data, F_DROPPED_LINKS, Py_NewRef(zero));
    /* (trace_id, span_id, is_remote, flags, state, is_valid): a SpanContext's tuple. */
    PyObject *context = PyTuple_Pack(6, trace_id, span_id, Py_False, context_flags, state,
                                     Py_True);
    Py_DECREF(trace_id);
    Py_DECREF(span_id);
    if (context == NULL) {
        Py_DECREF(data);
        return NULL;
    }
    return new_span(self, data, context, shared);
}

/* context_type(context): a copy of `context` (a new reference), made as dict makes one where
 * the class does not change how (OpenTelemetry's Context changes only its mutators). */
static PyObject *
copy_context(PyObject *context)
{
    if (plain_context && PyDict_Check(context)) {
        PyTypeObject *type = (PyTypeObject *)context_type;
        PyObject *copy = type->tp_new(type, empty_tuple, NULL);
        if (copy != NULL && PyDict_Merge(copy, context, 1) < 0) {
            Py_CLEAR(copy);
        }
        return copy;
    }
    return PyObject_CallOneArg(context_type, context);
}

/* The parent `start` takes for the span current in `context` (a new reference): its
 * context where it is a RecordingSpan, None where there is none, else what spans.py's
 * parent_of says (a NonRecordingSpan, a remote parent, another tracer's span). */
static PyObject *
parent_in(PyObject *context)
{
    if (PyDict_Check(context)) {
        PyObject *current = PyDict_GetItemWithError(context, span_key);  /* borrowed */
        if (current == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (Py_TYPE(current) == span_type) {
            PyObject *parent = SLOT(current, off_context);
            if (parent != NULL) {
                return Py_NewRef(parent);
            }
        }
        else if (Py_TYPE(current) == non_recording_type) {
            /* An unsampled or remote parent: what its get_span_context() returns. */
            PyObject *parent = PyObject_GetAttr(current, str_context);
            if (parent != NULL && PyTuple_Check(parent) && PyTuple_GET_SIZE(parent) >= 6) {
                return parent;
            }
            Py_XDECREF(parent);
            PyErr_Clear();
        }
    }
    return PyObject_CallOneArg(py_parent_of, context);
}

/* start_current's steps, its span and token set (new references) where it returns 0;
 * `parent`: the span's parent, NULL for the span current in the context. */
static int
start_current_parts(Starter *self, PyObject *const *args, PyObject *parent_given,
                    PyObject **span_out, PyObject **token_out)
{
    PyObject *context = args[1];
    if (context == Py_None) {
        if (PyContextVar_Get(context_variable, NULL, &context) < 0) {
            return -1;
        }
        if (context == NULL) {  /* no value and no default: an empty context */
            context = PyObject_CallNoArgs(context_type);
            if (context == NULL) {
                return -1;
            }
        }
    }
    else {
        Py_INCREF(context);
    }
    PyObject *parent = parent_given != NULL ? Py_NewRef(parent_given) : parent_in(context);
    if (parent == NULL) {
        Py_DECREF(context);
        return -1;
    }
    PyObject *start_args[4] = {args[0], parent, args[2], args[3]};
    PyObject *span = starter_start(self, start_args, 4, NULL);
    Py_DECREF(parent);
    if (span == NULL) {
        Py_DECREF(context);
        return -1;
    }
    /* Context({**context, span_key: span}): a copy with the span current. */
    PyObject *current = copy_context(context);
    Py_DECREF(context);
    if (current == NULL || !PyDict_Check(current) ||
        PyDict_SetItem(current, span_key, span) < 0) {
        if (current != NULL && !PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "the Context class is not a dict");
        }
        Py_XDECREF(current);
        Py_DECREF(span);
        return -1;
    }
    PyObject *token = PyContextVar_Set(context_variable, current);
    Py_DECREF(current);
    if (token == NULL) {
        Py_DECREF(span);
        return -1;
    }
    *span_out = span;
    *token_out = token;
    return 0;
}

/* start_current(name, context, kind, attributes, parent=None): LeanTracer.start_current
 * (see there). */
static PyObject *
starter_start_current(Starter *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (context_variable == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() was not called");
        return NULL;
    }
    if (nargs != 4 && nargs != 5) {
        PyErr_Format(PyExc_TypeError, "start_current takes 4 or 5 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *parent = nargs == 5 && args[4] != Py_None ? args[4] : NULL;
    PyObject *span, *token;
    if (start_current_parts(self, args, parent, &span, &token) < 0) {
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, span, token);
    Py_DECREF(span);
    Py_DECREF(token);
    return result;
}

/* record_prepared(name, parent, attributes, start_ns, end_ns, link=None, status=None):
 * LeanTracer's (see `_record_prepared`, which defines it): a sampled parent's span recorded
 * whole here; an invalid parent (a new trace), a status, or a link where the limits allow
 * none, by the Python method. */
static PyObject *
starter_record_prepared(Starter *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    Py_ssize_t positional = PyVectorcall_NARGS(nargs);
    Py_ssize_t keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    PyObject *link = Py_None, *status = Py_None;
    if (positional < 5 || positional > 7) {
        PyErr_Format(PyExc_TypeError, "record_prepared takes 5 to 7 arguments (%zd given)",
                     positional);
        return NULL;
    }
    if (positional >= 6) {
        link = args[5];
    }
    if (positional == 7) {
        status = args[6];
    }
    for (Py_ssize_t index = 0; index < keywords; index++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, index);
        if (PyUnicode_CompareWithASCIIString(key, "link") == 0) {
            link = args[positional + index];
        }
        else if (PyUnicode_CompareWithASCIIString(key, "status") == 0) {
            status = args[positional + index];
        }
        else {
            PyErr_Format(PyExc_TypeError, "record_prepared got an unexpected keyword %R", key);
            return NULL;
        }
    }
    PyObject *name = args[0], *parent = args[1], *attributes = args[2];
    if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 6) {
        PyErr_SetString(PyExc_TypeError, "parent: a span context (6-tuple)");
        return NULL;
    }
    if (!PyTuple_Check(attributes) || PyTuple_GET_SIZE(attributes) != 2) {
        PyErr_SetString(PyExc_TypeError, "attributes: (dict, dropped) from prepare()");
        return NULL;
    }
    if (link != Py_None && (!PyTuple_Check(link) || PyTuple_GET_SIZE(link) < 3)) {
        PyErr_SetString(PyExc_TypeError, "link: a span context (6-tuple) or None");
        return NULL;
    }
    int valid = PyObject_IsTrue(PyTuple_GET_ITEM(parent, 5));
    if (valid < 0) {
        return NULL;
    }
    if (!valid || status != Py_None || (link != Py_None && !self->links)) {
        PyObject *fallback = PyObject_GetAttrString(self->tracer, "_record_prepared");
        if (fallback == NULL) {
            return NULL;
        }
        PyObject *all[7] = {name, parent, attributes, args[3], args[4], link, status};
        PyObject *result = PyObject_Vectorcall(fallback, all, 7, NULL);
        Py_DECREF(fallback);
        return result;
    }
    long flags = PyLong_AsLong(PyTuple_GET_ITEM(parent, 3));
    if (flags == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (!(flags & 1)) {  /* not sampled */
        Py_RETURN_NONE;
    }
    PyObject *links = Py_NewRef(Py_None);
    if (link != Py_None) {
        int linked = PyObject_IsTrue(PyTuple_GET_ITEM(link, 0));
        if (linked == 0) {
            linked = PyObject_IsTrue(PyTuple_GET_ITEM(link, 1));
        }
        if (linked < 0) {
            Py_DECREF(links);
            return NULL;
        }
        if (linked) {
            PyObject *one = PyTuple_Pack(5, PyTuple_GET_ITEM(link, 0), PyTuple_GET_ITEM(link, 1),
                                         PyTuple_GET_ITEM(link, 2), self->no_attributes, zero);
            Py_SETREF(links, one == NULL ? NULL : PyList_New(1));
            if (links == NULL) {
                Py_XDECREF(one);
                return NULL;
            }
            PyList_SET_ITEM(links, 0, one);
        }
    }
    PyObject *state = PyTuple_GET_ITEM(parent, 4);
    PyObject *header = state == self->no_state ? Py_NewRef(empty_string)
                                               : PyObject_CallMethodNoArgs(state, str_to_header);
    PyObject *span_id = header == NULL ? NULL : new_span_id(self);
    if (span_id == NULL) {
        Py_XDECREF(header);
        Py_DECREF(links);
        return NULL;
    }
    PyObject *record = PyTuple_New(F_COUNT);
    if (record == NULL) {
        Py_DECREF(header);
        Py_DECREF(span_id);
        Py_DECREF(links);
        return NULL;
    }
    PyTuple_SET_ITEM(record, F_NAME, Py_NewRef(name));
    PyTuple_SET_ITEM(record, F_TRACE_ID, Py_NewRef(PyTuple_GET_ITEM(parent, 0)));
    PyTuple_SET_ITEM(record, F_SPAN_ID, span_id);
    PyTuple_SET_ITEM(record, F_TRACE_STATE, header);
    PyTuple_SET_ITEM(record, F_PARENT_ID, Py_NewRef(PyTuple_GET_ITEM(parent, 1)));
    PyTuple_SET_ITEM(record, F_PARENT_REMOTE, Py_NewRef(PyTuple_GET_ITEM(parent, 2)));
    PyTuple_SET_ITEM(record, F_KIND, Py_NewRef(self->internal));
    PyTuple_SET_ITEM(record, F_START, Py_NewRef(args[3]));
    PyTuple_SET_ITEM(record, F_END, Py_NewRef(args[4]));
    PyTuple_SET_ITEM(record, F_ATTRIBUTES, Py_NewRef(PyTuple_GET_ITEM(attributes, 0)));
    PyTuple_SET_ITEM(record, F_EVENTS, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(record, F_LINKS, links);
    PyTuple_SET_ITEM(record, F_STATUS_CODE, Py_NewRef(zero));
    PyTuple_SET_ITEM(record, F_STATUS_MESSAGE, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(record, F_DROPPED_ATTRIBUTES, Py_NewRef(PyTuple_GET_ITEM(attributes, 1)));
    PyTuple_SET_ITEM(record, F_DROPPED_EVENTS, Py_NewRef(zero));
    PyTuple_SET_ITEM(record, F_DROPPED_LINKS, Py_NewRef(zero));
    /* Final, and in no reference cycle (as an ended span's data list, `span_end`): the
     * garbage collector need not walk it while it waits in the export queue. */
    PyObject_GC_UnTrack(record);
    PyObject *result = PyObject_CallOneArg(self->record, record);
    Py_DECREF(record);
    return result;
}

static PyMethodDef starter_methods[] = {
    {"start", (PyCFunction)(void (*)(void))starter_start, METH_FASTCALL | METH_KEYWORDS,
     "start(name, parent, kind, attributes, start_time=None, shared=True): "
     "LeanTracer.start_prepared."},
    {"start_current", (PyCFunction)(void (*)(void))starter_start_current, METH_FASTCALL,
     "start_current(name, context, kind, attributes, parent=None): "
     "LeanTracer.start_current."},
    {"record_prepared", (PyCFunction)(void (*)(void))starter_record_prepared,
     METH_FASTCALL | METH_KEYWORDS,
     "record_prepared(name, parent, attributes, start_ns, end_ns, link=None, status=None): "
     "LeanTracer.record_prepared."},
    {"span_id", (PyCFunction)starter_span_id, METH_NOARGS,
     "span_id(): a new span id from the tracer's random words (spans.py's _Ids.span_id)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject StarterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "headrace.telemetry._fastspans.Starter",
    .tp_doc = "One tracer's start_prepared (see LeanTracer).",
    .tp_basicsize = sizeof(Starter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)starter_init,
    .tp_dealloc = (destructor)starter_dealloc,
    .tp_traverse = (traverseproc)starter_traverse,
    .tp_clear = (inquiry)starter_clear,
    .tp_methods = starter_methods,
};

/* ---- RecordingSpan.end ------------------------------------------------------------- */

struct Recorder;
static PyObject *recorder_record(struct Recorder *self, PyObject *span);

/* end(self, end_time=None): RecordingSpan.end (see there). */
static PyObject *
span_end(PyObject *span, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *end_time = Py_None;
    Py_ssize_t positional = PyVectorcall_NARGS(nargs);
    Py_ssize_t keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (positional + keywords > 1) {
        PyErr_SetString(PyExc_TypeError, "end() takes at most one argument, end_time");
        return NULL;
    }
    if (positional == 1) {
        end_time = args[0];
    }
    else if (keywords == 1) {
        if (PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "end_time") != 0) {
            PyErr_Format(PyExc_TypeError, "end() got an unexpected keyword %R",
                         PyTuple_GET_ITEM(kwnames, 0));
            return NULL;
        }
        end_time = args[0];
    }
    PyObject *data = SLOT(span, off_data);
    if (data == NULL || !PyList_CheckExact(data) || PyList_GET_SIZE(data) != F_COUNT) {
        PyErr_SetString(PyExc_TypeError, "end(): not a started RecordingSpan");
        return NULL;
    }
    if (PyList_GET_ITEM(data, F_END) != Py_None) {  /* ended before: say so, as Python does */
        PyObject *result = PyObject_CallMethodOneArg(span, str_ended, str_ending);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
        Py_RETURN_NONE;
    }
    PyObject *end = end_time == Py_None ? now_ns() : Py_NewRef(end_time);
    if (end == NULL) {
        return NULL;
    }
    PyObject *previous = PyList_GET_ITEM(data, F_END);
    PyList_SET_ITEM(data, F_END, end);
    Py_DECREF(previous);
    /* The list is final now (a FinishedSpan is never changed once ended) and holds no
     * reference cycle (names, ids, times, attribute values, which are never containers of
     * it): the garbage collector need not walk it, nor the thousands that wait in the
     * export queue, in every collection until they are sent. What it refers to stays
     * tracked where it was. */
    if (PyObject_GC_IsTracked(data)) {
        PyObject_GC_UnTrack(data);
    }
    PyObject *record = SLOT(span, off_record);
    if (record == NULL) {
        PyErr_SetString(PyExc_TypeError, "end(): not a started RecordingSpan");
        return NULL;
    }
    PyObject *result;
    if (PyCFunction_Check(record) &&
        PyCFunction_GET_FUNCTION(record) == (PyCFunction)recorder_record) {
        /* A SpanQueue's C recorder (the usual one): called without the call machinery. */
        result = recorder_record((struct Recorder *)PyCFunction_GET_SELF(record), data);
    }
    else {
        Py_INCREF(record);  /* the call may change the slot */
        result = PyObject_CallOneArg(record, data);
        Py_DECREF(record);
    }
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_NONE;
}

static PyMethodDef end_definition = {
    "end", (PyCFunction)(void (*)(void))span_end, METH_FASTCALL | METH_KEYWORDS,
    "end(end_time=None): end the span and hand its data to the tracer's recorder once.",
};

/* ---- RecordingSpan.set_prepared_attribute ---------------------------------------------- */

/* set_prepared_attribute(self, base, key, value, variants): RecordingSpan's (see there).
 * The common case here, a variant already made, swapped in; anything else (the first of a
 * value, a span changed since it started) by the Python method, `_set_prepared_attribute`. */
static PyObject *
span_set_prepared(PyObject *span, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "set_prepared_attribute takes 4 arguments (%zd given)",
                     nargs);
        return NULL;
    }
    PyObject *base = args[0], *value = args[2], *variants = args[3];
    PyObject *data = SLOT(span, off_data);
    if (data != NULL && PyList_CheckExact(data) && PyList_GET_SIZE(data) == F_COUNT &&
        SLOT(span, off_shared) == Py_True && PyTuple_Check(base) &&
        PyTuple_GET_SIZE(base) == 2 && PyList_GET_ITEM(data, F_ATTRIBUTES) ==
        PyTuple_GET_ITEM(base, 0) && PyList_GET_ITEM(data, F_END) == Py_None &&
        PyDict_CheckExact(variants)) {
        PyObject *variant = PyDict_GetItemWithError(variants, value);  /* borrowed */
        if (variant == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (variant != NULL && PyTuple_CheckExact(variant) && PyTuple_GET_SIZE(variant) == 2) {
            PyObject *attributes = PyList_GET_ITEM(data, F_ATTRIBUTES);
            PyObject *dropped = PyList_GET_ITEM(data, F_DROPPED_ATTRIBUTES);
            PyList_SET_ITEM(data, F_ATTRIBUTES, Py_NewRef(PyTuple_GET_ITEM(variant, 0)));
            PyList_SET_ITEM(data, F_DROPPED_ATTRIBUTES, Py_NewRef(PyTuple_GET_ITEM(variant, 1)));
            Py_DECREF(attributes);
            Py_DECREF(dropped);
            Py_RETURN_NONE;
        }
    }
    PyObject *method = PyObject_GetAttr(span, str_set_prepared);
    if (method == NULL) {
        return NULL;
    }
    PyObject *result = PyObject_Vectorcall(method, args, nargs, NULL);
    Py_DECREF(method);
    return result;
}

static PyMethodDef set_prepared_definition = {
    "set_prepared_attribute", (PyCFunction)(void (*)(void))span_set_prepared, METH_FASTCALL,
    "set_prepared_attribute(base, key, value, variants): see RecordingSpan.",
};

/* ---- Recorder: SpanQueue's record and take ------------------------------------------ */

/* The queue itself: a ring of strong references, grown by doubling up to `max_queued`.
 * `take` moves references out (no count changes, no copy of what stays), so the sender's
 * share of the queue is one C call a chunk, not a Python step a span. */
typedef struct Recorder {
    PyObject_HEAD
    PyObject **ring;
    Py_ssize_t capacity;   /* slots allocated: 0, or a power of two */
    Py_ssize_t head;       /* the oldest span's slot */
    Py_ssize_t queued;
    PyObject *wake;        /* the sender's Event.set */
    Py_ssize_t max_queued;
    Py_ssize_t batch_size;
    Py_ssize_t dropped;
} Recorder;

#define RING_SLOT(self, index) ((self)->ring[((self)->head + (index)) & ((self)->capacity - 1)])

static int
recorder_traverse(Recorder *self, visitproc visit, void *arg)
{
    for (Py_ssize_t index = 0; index < self->queued; index++) {
        Py_VISIT(RING_SLOT(self, index));
    }
    Py_VISIT(self->wake);
    return 0;
}

static int
recorder_clear(Recorder *self)
{
    /* Slots are emptied before their references go: a span's finalizer sees a valid ring. */
    while (self->queued > 0) {
        PyObject *span = RING_SLOT(self, 0);
        self->head = (self->head + 1) & (self->capacity - 1);
        self->queued--;
        Py_DECREF(span);
    }
    Py_CLEAR(self->wake);
    return 0;
}

static void
recorder_dealloc(Recorder *self)
{
    PyObject_GC_UnTrack(self);
    recorder_clear(self);
    PyMem_Free(self->ring);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
recorder_init(Recorder *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"wake", "max_queued", "batch_size", NULL};
    PyObject *wake;
    Py_ssize_t max_queued, batch_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onn", names, &wake, &max_queued,
                                     &batch_size)) {
        return -1;
    }
    if (!PyCallable_Check(wake) || max_queued < 1 || batch_size < 1) {
        PyErr_SetString(PyExc_ValueError,
                        "Recorder(wake callable, max_queued >= 1, batch_size >= 1)");
        return -1;
    }
    recorder_clear(self);
    self->wake = Py_NewRef(wake);
    self->max_queued = max_queued;
    self->batch_size = batch_size;
    self->dropped = 0;
    return 0;
}

/* Room for one more span; -1 (MemoryError) where the ring cannot grow. */
static int
recorder_grow(Recorder *self)
{
    Py_ssize_t capacity = self->capacity ? self->capacity * 2 : 256;
    if (capacity > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(PyObject *)) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject **ring = PyMem_Malloc((size_t)capacity * sizeof(PyObject *));
    if (ring == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t index = 0; index < self->queued; index++) {
        ring[index] = RING_SLOT(self, index);
    }
    PyMem_Free(self->ring);
    self->ring = ring;
    self->capacity = capacity;
    self->head = 0;
    return 0;
}

/* record(span): SpanQueue's _Recorder.record (see there). */
static PyObject *
recorder_record(Recorder *self, PyObject *span)
{
    Py_ssize_t queued = self->queued;
    if (queued >= self->max_queued) {
        self->dropped++;
        Py_RETURN_NONE;
    }
    if (queued == self->capacity && recorder_grow(self) < 0) {
        return NULL;
    }
    RING_SLOT(self, queued) = Py_NewRef(span);
    self->queued = queued + 1;
    if (queued + 1 == self->batch_size) {
        PyObject *result = PyObject_CallNoArgs(self->wake);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
    }
    Py_RETURN_NONE;
}

/* take(count): SpanQueue.take (see there). */
static PyObject *
recorder_take(Recorder *self, PyObject *argument)
{
    Py_ssize_t count = PyLong_AsSsize_t(argument);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count > self->queued) {
        count = self->queued;
    }
    PyObject *taken = PyList_New(count > 0 ? count : 0);
    if (taken == NULL) {
        return NULL;
    }
    for (Py_ssize_t index = 0; index < count; index++) {
        PyList_SET_ITEM(taken, index, RING_SLOT(self, 0)); /* the ring's reference */
        self->head = (self->head + 1) & (self->capacity - 1);
        self->queued--;
    }
    return taken;
}

static Py_ssize_t
recorder_length(Recorder *self)
{
    return self->queued;
}

static PySequenceMethods recorder_as_sequence = {
    .sq_length = (lenfunc)recorder_length,
};

static PyMethodDef recorder_methods[] = {
    {"record", (PyCFunction)recorder_record, METH_O,
     "record(span): queue a finished span, or count it dropped when the queue is full."},
    {"take", (PyCFunction)recorder_take, METH_O,
     "take(count) -> list: up to `count` of the oldest spans, taken out of the queue."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef recorder_members[] = {
    {"dropped", T_PYSSIZET, offsetof(Recorder, dropped), 0,
     "Spans dropped because the queue was full (and any the sender adds)."},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "headrace.telemetry._fastspans.Recorder",
    .tp_doc = "A SpanQueue's queue: record and take (see spans._Recorder).",
    .tp_basicsize = sizeof(Recorder),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)recorder_init,
    .tp_dealloc = (destructor)recorder_dealloc,
    .tp_traverse = (traverseproc)recorder_traverse,
    .tp_clear = (inquiry)recorder_clear,
    .tp_as_sequence = &recorder_as_sequence,
    .tp_methods = recorder_methods,
    .tp_members = recorder_members,
};

/* ---- end_current --------------------------------------------------------------------- */

/* span.end(): ours in C, a NonRecordingSpan's (which does nothing) skipped, others called. */
static PyObject *
end_span(PyObject *span)
{
    if (Py_TYPE(span) == span_type) {
        return span_end(span, NULL, 0, NULL);
    }
    if (Py_TYPE(span) == non_recording_type) {
        Py_RETURN_NONE;
    }
    return PyObject_CallMethodNoArgs(span, str_end);
}

/* end_current(span, token, error): spans.end_current (see there). */
static PyObject *
end_current(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (context_variable == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() was not called");
        return NULL;
    }
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "end_current takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *span = args[0], *token = args[1], *error = args[2];
    if (!PyContextToken_CheckExact(token) || PyContextVar_Reset(context_variable, token) < 0) {
        /* Not this variable's token, or used before: the Python step logs it, as the API's
         * detach does, and the span still ends. */
        PyErr_Clear();
        PyObject *result = PyObject_CallOneArg(py_detach, token);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
    }
    if (error != Py_None) {
        return PyObject_CallFunctionObjArgs(py_end_failed, span, error, NULL);
    }
    return end_span(span);
}

/* ---- ServerSpans: one traced RPC method's server span ------------------------------ */

/* The start and finish of the server interceptor's span (interceptor.py's `_starter` and
 * `_finish`, which define them): the common case here; a call that failed (an exception
 * escaped its handler), ended with a server error code, or holds a span of another class,
 * is finished by the Python `_finish`. */
typedef struct {
    PyObject_HEAD
    Starter *starter;          /* the tracer's */
    PyObject *name;            /* the span name, `package.Service/Method` */
    PyObject *kind;            /* SpanKind.SERVER */
    PyObject *by_peer;         /* dict: peer -> (Prepared, variants), read first */
    PyObject *for_peer;        /* peer -> (Prepared, variants), made and kept */
    PyObject *metadata;        /* the ContextVar holding the call's metadata, if set */
    PyObject *extract;         /* the propagator's extract(carrier) -> Context */
    PyObject *no_parent;       /* the Context of a call without a trace context */
    PyObject *code_type;       /* grpc.StatusCode */
    PyObject *error_numbers;   /* the codes (numbers) that make the span's status ERROR */
    PyObject *finish;          /* the Python _finish(span, token, attributes, context, error) */
    PyObject *status_key;      /* "rpc.grpc.status_code" */
} ServerSpans;

static PyObject *str_code = NULL;                 /* "code" */
static PyObject *str_peer = NULL;                 /* "peer" */
static PyObject *str_invocation_metadata = NULL;  /* "invocation_metadata" */

static int
server_spans_traverse(ServerSpans *self, visitproc visit, void *arg)
{
    Py_VISIT(self->starter);
    Py_VISIT(self->name);
    Py_VISIT(self->kind);
    Py_VISIT(self->by_peer);
    Py_VISIT(self->for_peer);
    Py_VISIT(self->metadata);
    Py_VISIT(self->extract);
    Py_VISIT(self->no_parent);
    Py_VISIT(self->code_type);
    Py_VISIT(self->error_numbers);
    Py_VISIT(self->finish);
    Py_VISIT(self->status_key);
    return 0;
}

static int
server_spans_clear(ServerSpans *self)
{
    Py_CLEAR(self->starter);
    Py_CLEAR(self->name);
    Py_CLEAR(self->kind);
    Py_CLEAR(self->by_peer);
    Py_CLEAR(self->for_peer);
    Py_CLEAR(self->metadata);
    Py_CLEAR(self->extract);
    Py_CLEAR(self->no_parent);
    Py_CLEAR(self->code_type);
    Py_CLEAR(self->error_numbers);
    Py_CLEAR(self->finish);
    Py_CLEAR(self->status_key);
    return 0;
}

static void
server_spans_dealloc(ServerSpans *self)
{
    PyObject_GC_UnTrack(self);
    server_spans_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
server_spans_init(ServerSpans *self, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"starter", "name", "kind", "by_peer", "for_peer", "metadata",
                            "extract", "no_parent", "code_type", "error_numbers", "finish",
                            "status_key", NULL};
    PyObject *starter, *name, *kind, *by_peer, *for_peer, *metadata, *extract, *no_parent;
    PyObject *code_type, *error_numbers, *finish, *status_key;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!UOO!OO!OOO!O!OU", names, &StarterType,
                                     &starter, &name, &kind, &PyDict_Type, &by_peer, &for_peer,
                                     &PyContextVar_Type, &metadata, &extract, &no_parent,
                                     &PyType_Type, &code_type, &PyFrozenSet_Type,
                                     &error_numbers, &finish, &status_key)) {
        return -1;
    }
    if (!PyCallable_Check(for_peer) || !PyCallable_Check(extract) ||
        !PyCallable_Check(finish)) {
        PyErr_SetString(PyExc_TypeError, "for_peer, extract and finish must be callable");
        return -1;
    }
    if (context_variable == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() was not called");
        return -1;
    }
    server_spans_clear(self);
    self->starter = (Starter *)Py_NewRef(starter);
    self->name = Py_NewRef(name);
    self->kind = Py_NewRef(kind);
    self->by_peer = Py_NewRef(by_peer);
    self->for_peer = Py_NewRef(for_peer);
    self->metadata = Py_NewRef(metadata);
    self->extract = Py_NewRef(extract);
    self->no_parent = Py_NewRef(no_parent);
    self->code_type = Py_NewRef(code_type);
    self->error_numbers = Py_NewRef(error_numbers);
    self->finish = Py_NewRef(finish);
    self->status_key = Py_NewRef(status_key);
    return 0;
}

/* Whether `key` is one of the two trace context keys the propagator reads. */
static int
is_trace_context_key(PyObject *key)
{
    if (!PyUnicode_Check(key)) {
        return 0;
    }
    Py_ssize_t length = PyUnicode_GET_LENGTH(key);
    return (length == 11 && PyUnicode_CompareWithASCIIString(key, "traceparent") == 0) ||
           (length == 10 && PyUnicode_CompareWithASCIIString(key, "tracestate") == 0);
}

/* Add `item`, a (key, value) pair of the metadata, to `*carrier` (made on the first) where
 * its key is a trace context key. */
static int
carry_trace_context(PyObject *item, PyObject **carrier)
{
    PyObject *key, *value;
    PyObject *pair = NULL;
    /* A tuple, or a tuple's subclass that iterates as one (grpc's `_Metadatum`, a named
     * tuple): its two items are what unpacking it gives. */
    if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 2 &&
        Py_TYPE(item)->tp_iter == PyTuple_Type.tp_iter) {
        key = PyTuple_GET_ITEM(item, 0);
        value = PyTuple_GET_ITEM(item, 1);
    }
    else {  /* another pair (a list, a tuple that iterates its own way): unpacked as Python
             * would */
        pair = PySequence_Tuple(item);
        if (pair == NULL) {
            return -1;
        }
        if (PyTuple_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_ValueError,
                         "metadata: a (key, value) pair expected, got %zd items",
                         PyTuple_GET_SIZE(pair));
            Py_DECREF(pair);
            return -1;
        }
        key = PyTuple_GET_ITEM(pair, 0);
        value = PyTuple_GET_ITEM(pair, 1);
    }
    int status = 0;
    if (is_trace_context_key(key)) {
        if (*carrier == NULL && (*carrier = PyDict_New()) == NULL) {
            status = -1;
        }
        else {
            status = PyDict_SetItem(*carrier, key, value);
        }
    }
    Py_XDECREF(pair);
    return status;
}

/* start(context) -> (span, token, attributes): the call's span started and made current
 * (interceptor.py's `_starter`, which defines it). */
static PyObject *
server_spans_start(ServerSpans *self, PyObject *context)
{
    PyObject *metadata;
    if (PyContextVar_Get(self->metadata, NULL, &metadata) < 0) {
        return NULL;
    }
    if (metadata == NULL || metadata == Py_None) {
        Py_XDECREF(metadata);
        metadata = PyObject_CallMethodNoArgs(context, str_invocation_metadata);
        if (metadata == NULL) {
            return NULL;
        }
    }
    PyObject *carrier = NULL;
    int failed = 0;
    if (PyTuple_CheckExact(metadata)) {
        for (Py_ssize_t index = 0; index < PyTuple_GET_SIZE(metadata) && !failed; index++) {
            failed = carry_trace_context(PyTuple_GET_ITEM(metadata, index), &carrier) < 0;
        }
    }
    else if (metadata != Py_None) {
        PyObject *items = PyObject_GetIter(metadata);
        if (items == NULL) {
            failed = 1;
        }
        else {
            PyObject *item;
            while (!failed && (item = PyIter_Next(items)) != NULL) {
                failed = carry_trace_context(item, &carrier) < 0;
                Py_DECREF(item);
            }
            failed = failed || PyErr_Occurred() != NULL;
            Py_DECREF(items);
        }
    }
    Py_DECREF(metadata);
    if (failed) {
        Py_XDECREF(carrier);
        return NULL;
    }
    PyObject *parent;
    if (carrier == NULL) {
        parent = Py_NewRef(self->no_parent);
    }
    else {
        parent = PyObject_CallOneArg(self->extract, carrier);
        Py_DECREF(carrier);
        if (parent == NULL) {
            return NULL;
        }
    }
    PyObject *peer = PyObject_CallMethodNoArgs(context, str_peer);
    if (peer == NULL) {
        Py_DECREF(parent);
        return NULL;
    }
    PyObject *attributes = PyDict_GetItemWithError(self->by_peer, peer);  /* borrowed */
    if (attributes != NULL) {
        Py_INCREF(attributes);
    }
    else if (!PyErr_Occurred()) {
        attributes = PyObject_CallOneArg(self->for_peer, peer);
    }
    Py_DECREF(peer);
    if (attributes == NULL) {
        Py_DECREF(parent);
        return NULL;
    }
    if (!PyTuple_Check(attributes) || PyTuple_GET_SIZE(attributes) != 2) {
        PyErr_SetString(PyExc_TypeError, "for_peer: (Prepared, variants) expected");
        Py_DECREF(parent);
        Py_DECREF(attributes);
        return NULL;
    }
    PyObject *start_args[4] = {self->name, parent, self->kind, PyTuple_GET_ITEM(attributes, 0)};
    PyObject *span, *token;
    int started = start_current_parts(self->starter, start_args, NULL, &span, &token);
    Py_DECREF(parent);
    if (started < 0) {
        Py_DECREF(attributes);
        return NULL;
    }
    PyObject *result = PyTuple_New(3);
    if (result == NULL) {
        Py_DECREF(attributes);
        Py_DECREF(span);
        Py_DECREF(token);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, span);
    PyTuple_SET_ITEM(result, 1, token);
    PyTuple_SET_ITEM(result, 2, attributes);
    return result;
}

/* finish(span, token, attributes, context, error): interceptor.py's `_finish`. */
static PyObject *
server_spans_finish(ServerSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError, "finish takes 5 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *span = args[0], *token = args[1], *attributes = args[2], *context = args[3];
    PyObject *error = args[4];
    if (error != Py_None || !PyTuple_Check(attributes) || PyTuple_GET_SIZE(attributes) != 2 ||
        (Py_TYPE(span) != span_type && Py_TYPE(span) != non_recording_type)) {
        return PyObject_Vectorcall(self->finish, args, nargs, NULL);
    }
    PyObject *code = PyObject_CallMethodNoArgs(context, str_code);
    if (code == NULL) {
        return NULL;
    }
    PyObject *number;
    if (Py_TYPE(code) == (PyTypeObject *)self->code_type) {
        PyObject *value = PyObject_GetAttr(code, str_value);
        if (value == NULL) {
            Py_DECREF(code);
            return NULL;
        }
        if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) < 1) {
            Py_DECREF(value);
            Py_DECREF(code);
            return PyObject_Vectorcall(self->finish, args, nargs, NULL);
        }
        number = Py_NewRef(PyTuple_GET_ITEM(value, 0));
        Py_DECREF(value);
    }
    else {  /* None until the handler sets one: OK, the handler returned */
        number = Py_NewRef(zero);
    }
    Py_DECREF(code);
    int server_error = PySet_Contains(self->error_numbers, number);
    if (server_error != 0) {
        Py_DECREF(number);
        return server_error < 0 ? NULL : PyObject_Vectorcall(self->finish, args, nargs, NULL);
    }
    if (Py_TYPE(span) == span_type) {
        PyObject *set_args[4] = {PyTuple_GET_ITEM(attributes, 0), self->status_key, number,
                                 PyTuple_GET_ITEM(attributes, 1)};
        PyObject *result = span_set_prepared(span, set_args, 4);
        if (result == NULL) {
            Py_DECREF(number);
            return NULL;
        }
        Py_DECREF(result);
    }
    Py_DECREF(number);
    if (token == Py_None) {  /* the context is left as it is */
        return end_span(span);
    }
    PyObject *end_args[3] = {span, token, Py_None};
    return end_current(NULL, end_args, 3);
}

static PyMethodDef server_spans_methods[] = {
    {"start", (PyCFunction)server_spans_start, METH_O,
     "start(context) -> (span, token, attributes): interceptor.py's `_starter`."},
    {"finish", (PyCFunction)(void (*)(void))server_spans_finish, METH_FASTCALL,
     "finish(span, token, attributes, context, error): interceptor.py's `_finish`."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ServerSpansType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "headrace.telemetry._fastspans.ServerSpans",
    .tp_doc = "One traced RPC method's server span start and finish (see interceptor.py).",
    .tp_basicsize = sizeof(ServerSpans),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)server_spans_init,
    .tp_dealloc = (destructor)server_spans_dealloc,
    .tp_traverse = (traverseproc)server_spans_traverse,
    .tp_clear = (inquiry)server_spans_clear,
    .tp_methods = server_spans_methods,
};

/* configure(variable, span_key, context_type, parent_of, end_failed, detach,
 * non_recording_type): what start_current and end_current work with (see the module state
 * above). */
static PyObject *
configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "configure takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyContextVar_CheckExact(args[0]) || !PyUnicode_Check(args[1]) ||
        !PyType_Check(args[2]) || !PyType_IsSubtype((PyTypeObject *)args[2], &PyDict_Type) ||
        !PyType_Check(args[6])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(ContextVar, str, a dict subclass, parent_of, end_failed, "
                        "detach, NonRecordingSpan)");
        return NULL;
    }
    for (Py_ssize_t index = 3; index < 6; index++) {
        if (!PyCallable_Check(args[index])) {
            PyErr_SetString(PyExc_TypeError, "configure: parent_of, end_failed and detach "
                                             "must be callable");
            return NULL;
        }
    }
    Py_XSETREF(context_variable, Py_NewRef(args[0]));
    Py_XSETREF(span_key, Py_NewRef(args[1]));
    Py_XSETREF(context_type, Py_NewRef(args[2]));
    plain_context = ((PyTypeObject *)args[2])->tp_new == PyDict_Type.tp_new &&
                    ((PyTypeObject *)args[2])->tp_init == PyDict_Type.tp_init;
    Py_XSETREF(py_parent_of, Py_NewRef(args[3]));
    Py_XSETREF(py_end_failed, Py_NewRef(args[4]));
    Py_XSETREF(py_detach, Py_NewRef(args[5]));
    Py_XSETREF(non_recording_type, (PyTypeObject *)Py_NewRef(args[6]));
    Py_RETURN_NONE;
}

/* ---- install ------------------------------------------------------------------------ */

static Py_ssize_t
slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descriptor = PyDict_GetItemString(type->tp_dict, name);  /* borrowed */
    if (descriptor == NULL || !PyObject_TypeCheck(descriptor, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a slot", type->tp_name, name);
        return -1;
    }
    PyMemberDef *member = ((PyMemberDescrObject *)descriptor)->d_member;
    if (member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    return member->offset;
}

/* install(RecordingSpan): read its slots' offsets; returns the C `end` and
 * `set_prepared_attribute` as method descriptors of that class, for spans.py to set on it. */
static PyObject *
install(PyObject *module, PyObject *type)
{
    if (!PyType_Check(type)) {
        PyErr_SetString(PyExc_TypeError, "install(RecordingSpan): a class");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)type;
    Py_ssize_t data = slot_offset(cls, "_data"), context = slot_offset(cls, "_context");
    Py_ssize_t tracer = slot_offset(cls, "_tracer"), shared = slot_offset(cls, "_shared");
    Py_ssize_t record = slot_offset(cls, "_record");
    if (data < 0 || context < 0 || tracer < 0 || shared < 0 || record < 0) {
        return NULL;
    }
    Py_XSETREF(span_type, (PyTypeObject *)Py_NewRef(type));
    off_data = data;
    off_context = context;
    off_tracer = tracer;
    off_shared = shared;
    off_record = record;
    PyObject *end = PyDescr_NewMethod(cls, &end_definition);
    PyObject *set_prepared = PyDescr_NewMethod(cls, &set_prepared_definition);
    if (end == NULL || set_prepared == NULL) {
        Py_XDECREF(end);
        Py_XDECREF(set_prepared);
        return NULL;
    }
    PyObject *result = PyTuple_Pack(2, end, set_prepared);
    Py_DECREF(end);
    Py_DECREF(set_prepared);
    return result;
}

static PyMethodDef module_methods[] = {
    {"install", install, METH_O,
     "install(RecordingSpan): read its slots; returns (end, set_prepared_attribute), its "
     "methods."},
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(variable, span_key, context_type, parent_of, end_failed, detach, "
     "non_recording_type): the current context, for start_current and end_current."},
    {"end_current", (PyCFunction)(void (*)(void))end_current, METH_FASTCALL,
     "end_current(span, token, error): spans.end_current."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "headrace.telemetry._fastspans",
    .m_doc = "The lean tracer's span start and end in C (optional; see spans.py).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__fastspans(void)
{
    if (PyType_Ready(&StarterType) < 0 || PyType_Ready(&RecorderType) < 0 ||
        PyType_Ready(&ServerSpansType) < 0) {
        return NULL;
    }
    str_value = PyUnicode_InternFromString("_value_");
    str_to_header = PyUnicode_InternFromString("to_header");
    str_record = PyUnicode_InternFromString("_record");
    str_ended = PyUnicode_InternFromString("_ended");
    str_ending = PyUnicode_InternFromString("ending");
    str_end = PyUnicode_InternFromString("end");
    str_set_prepared = PyUnicode_InternFromString("_set_prepared_attribute");
    str_context = PyUnicode_InternFromString("_context");
    str_code = PyUnicode_InternFromString("code");
    str_peer = PyUnicode_InternFromString("peer");
    str_invocation_metadata = PyUnicode_InternFromString("invocation_metadata");
    empty_string = PyUnicode_FromString("");
    empty_tuple = PyTuple_New(0);
    zero = PyLong_FromLong(0);
    if (str_value == NULL || str_to_header == NULL || str_record == NULL || str_ended == NULL ||
        str_ending == NULL || str_end == NULL || str_set_prepared == NULL || str_context == NULL ||
        str_code == NULL || str_peer == NULL || str_invocation_metadata == NULL ||
        empty_string == NULL || empty_tuple == NULL || zero == NULL) {
        return NULL;
    }
    if (pthread_atfork(NULL, NULL, count_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "Starter", (PyObject *)&StarterType) < 0 ||
        PyModule_AddObjectRef(module, "Recorder", (PyObject *)&RecorderType) < 0 ||
        PyModule_AddObjectRef(module, "ServerSpans", (PyObject *)&ServerSpansType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
