/*
 * The floor for every kvmfs ioctl: a C libfuse daemon serving one file, "null",
 * whose ioctls do nothing (_IOR commands get zeroed bytes back). `kvmfs bench`
 * builds it with the system compiler and times a round trip through it next to
 * kvmfs and /dev/kvm.
 *
 *   cc -O2 -o null_fuse null_fuse.c $(pkg-config --cflags --libs fuse3)
 *   ./null_fuse MOUNTPOINT      (foreground, single-threaded; unmount to stop)
 */
#define FUSE_USE_VERSION 35
#include <errno.h>
#include <fuse_lowlevel.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#define NULL_INODE 2
static char zeroes[1 << 14];

static void fill(struct stat *st, fuse_ino_t ino)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = ino;
    st->st_mode = ino == FUSE_ROOT_ID ? S_IFDIR | 0755 : S_IFREG | 0666;
    st->st_nlink = 1;
}

static void null_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e = {.ino = NULL_INODE, .attr_timeout = 60, .entry_timeout = 60};
    if (parent != FUSE_ROOT_ID || strcmp(name, "null") != 0) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill(&e.attr, NULL_INODE);
    fuse_reply_entry(req, &e);
}

static void null_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    fill(&st, ino);
    fuse_reply_attr(req, &st, 60);
}

static void null_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    fi->direct_io = 1;
    fuse_reply_open(req, fi);
}

static void null_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg, struct fuse_file_info *fi,
                       unsigned flags, const void *in_buf, size_t in_bufsz, size_t out_bufsz)
{
    (void)ino, (void)cmd, (void)arg, (void)fi, (void)flags, (void)in_buf, (void)in_bufsz;
    fuse_reply_ioctl(req, 0, out_bufsz ? zeroes : NULL, out_bufsz);
}

static const struct fuse_lowlevel_ops ops = {
    .lookup = null_lookup,
    .getattr = null_getattr,
    .open = null_open,
    .ioctl = null_ioctl,
};

int main(int argc, char *argv[])
{
    char *fuse_argv[] = {argv[0], NULL};
    struct fuse_args args = FUSE_ARGS_INIT(1, fuse_argv);
    struct fuse_session *session;
    int status = 1;

    if (argc != 2) {
        fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]);
        return 2;
    }
    session = fuse_session_new(&args, &ops, sizeof(ops), NULL);
    if (session && fuse_session_mount(session, argv[1]) == 0) {
        status = fuse_session_loop(session) != 0;
        fuse_session_unmount(session);
    }
    if (session)
        fuse_session_destroy(session);
    return status;
}
