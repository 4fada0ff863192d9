/*
 * The ioctl shim: gives pyfuse3 (3.5.0, which has no ioctl operation) one.
 *
 * How: this extension defines fuse_session_new(). kvmfs.ioctl_shim loads it with
 * RTLD_GLOBAL before pyfuse3 is imported, so pyfuse3's call binds here. We copy
 * pyfuse3's operations table, add .ioctl, and call libfuse's real
 * fuse_session_new (dlsym RTLD_NEXT). Everything else stays pyfuse3's.
 *
 * The .ioctl handler runs in the trio thread, inside pyfuse3's call to
 * fuse_session_process_buf, with the GIL held. It hands the request to the
 * Python handler installed with install(); Python answers it exactly once, now
 * or later, with reply() or reply_error(). watch_interrupt() registers a
 * FUSE_INTERRUPT callback: it only calls the Python interrupt handler (which
 * must only signal: libfuse holds the request's lock while it runs).
 *
 * reply() and reply_error() may be called from any thread (libfuse replies are
 * thread-safe); they release the GIL while writing to /dev/fuse.
 *
 * Requests travel to Python as integers (the fuse_req_t pointer). The Python
 * wrapper (kvmfs/ioctl_shim.py) guarantees each is answered once and only once.
 * Delete this file the day pyfuse3 grows an ioctl operation.
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <fuse_lowlevel.h>
#include <string.h>

static struct fuse_lowlevel_ops ops_with_ioctl;
static PyObject *ioctl_handler;     /* handler(req, ino, fh, cmd, arg, in_bytes, out_size, pid, uid) */
static PyObject *interrupt_handler; /* interrupt_handler(req) */

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
                                               void *);

static void on_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                     unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    PyGILState_STATE gil = PyGILState_Ensure();
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    PyObject *result = NULL;

    if (ioctl_handler == NULL || (flags & FUSE_IOCTL_COMPAT)) {
        fuse_reply_err(req, ioctl_handler == NULL ? ENOSYS : ENOTTY);
        goto out;
    }
    result = PyObject_CallFunction(ioctl_handler, "KKKIKy#nIII", (unsigned long long)(uintptr_t)req,
                                   (unsigned long long)ino, (unsigned long long)fi->fh, cmd,
                                   (unsigned long long)(uintptr_t)arg, (const char *)in_buf,
                                   (Py_ssize_t)(in_buf ? in_bufsz : 0), (Py_ssize_t)out_bufsz,
                                   (unsigned)ctx->pid, (unsigned)ctx->uid, flags);
    if (result == NULL)
        /* The Python wrapper answers every request itself; an exception here is a kvmfs bug. */
        PyErr_Print();
    Py_XDECREF(result);
out:
    PyGILState_Release(gil);
}

static void on_interrupt(fuse_req_t req, void *data)
{
    (void)data;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *result = PyObject_CallFunction(interrupt_handler, "K", (unsigned long long)(uintptr_t)req);
    if (result == NULL)
        PyErr_Print();
    Py_XDECREF(result);
    PyGILState_Release(gil);
}

/* Exported under libfuse's name: pyfuse3 binds to this one. */
struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size,
                                      void *userdata)
{
    session_new_fn real = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
    if (real == NULL || op_size > sizeof(ops_with_ioctl))
        return NULL;
    memset(&ops_with_ioctl, 0, sizeof(ops_with_ioctl));
    memcpy(&ops_with_ioctl, op, op_size);
    ops_with_ioctl.ioctl = on_ioctl;
    return real(args, &ops_with_ioctl, sizeof(ops_with_ioctl), userdata);
}

static PyObject *install(PyObject *self, PyObject *args)
{
    PyObject *handler, *on_intr;
    if (!PyArg_ParseTuple(args, "OO", &handler, &on_intr))
        return NULL;
    Py_XSETREF(ioctl_handler, Py_NewRef(handler));
    Py_XSETREF(interrupt_handler, Py_NewRef(on_intr));
    Py_RETURN_NONE;
}

static PyObject *reply(PyObject *self, PyObject *args)
{
    unsigned long long req;
    int result;
    Py_buffer out = {0};
    if (!PyArg_ParseTuple(args, "Kiz*", &req, &result, &out))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS /* a vcpu thread may answer while the trio thread serves FUSE */
    rc = fuse_reply_ioctl((fuse_req_t)(uintptr_t)req, result, out.buf, out.buf ? (size_t)out.len : 0);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    return PyLong_FromLong(rc);
}

static PyObject *reply_error(PyObject *self, PyObject *args)
{
    unsigned long long req;
    int err;
    if (!PyArg_ParseTuple(args, "Ki", &req, &err))
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fuse_reply_err((fuse_req_t)(uintptr_t)req, err);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *watch_interrupt(PyObject *self, PyObject *args)
{
    unsigned long long req;
    if (!PyArg_ParseTuple(args, "K", &req))
        return NULL;
    /* May call on_interrupt at once if the interrupt already arrived. */
    fuse_req_interrupt_func((fuse_req_t)(uintptr_t)req, on_interrupt, NULL);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS, "install(handler, interrupt_handler): route FUSE ioctls to Python."},
    {"reply", reply, METH_VARARGS, "reply(req, result, out_bytes_or_None): fuse_reply_ioctl."},
    {"reply_error", reply_error, METH_VARARGS, "reply_error(req, errno): fuse_reply_err."},
    {"watch_interrupt", watch_interrupt, METH_VARARGS, "watch_interrupt(req): report FUSE_INTERRUPT for req."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvmfs._ioctl", "pyfuse3 ioctl shim", -1, methods};

PyMODINIT_FUNC PyInit__ioctl(void) { return PyModule_Create(&module); }
