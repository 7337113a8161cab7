/* A FUSE file system that answers its owner's user and hangs root: what a user can mount
 * over their own files (`allow_other`) to hold a root service's threads in the kernel.
 *
 *   fuse_block BACKING CONTROL MOUNTPOINT [fuse options]
 *
 * Every call is passed through to the directory BACKING, except that a call made by uid 0
 * blocks while CONTROL/arm exists and CONTROL/release does not (polled every 50 ms; killing
 * the daemon aborts the connection, which also ends every blocked call with ENOTCONN).
 * So: create CONTROL/arm before mounting to hang root from the first call, or after the
 * service has set up its watch to hang it later. With CONTROL/files-only too, only opening
 * and reading files hangs (directories answer). Built by tests/test_isolation.py with
 * `cc fuse_block.c $(pkg-config --cflags --libs fuse3)`.
 */
#define FUSE_USE_VERSION 31
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <unistd.h>

static const char *backing, *control;

static void gate_op(int file_op) {
    char arm[PATH_MAX], rel[PATH_MAX], files[PATH_MAX];
    if (fuse_get_context()->uid != 0)
        return;
    snprintf(files, sizeof files, "%s/files-only", control);
    if (!file_op && access(files, F_OK) == 0)
        return;
    snprintf(arm, sizeof arm, "%s/arm", control);
    snprintf(rel, sizeof rel, "%s/release", control);
    while (access(arm, F_OK) == 0 && access(rel, F_OK) != 0)
        usleep(50000);
}

static void gate(void) { gate_op(0); }

static void real(char *out, const char *path) {
    snprintf(out, PATH_MAX, "%s%s", backing, path);
}

#define REAL(p) \
    char p##_r[PATH_MAX]; \
    gate(); \
    real(p##_r, p)

static int fb_getattr(const char *path, struct stat *st, struct fuse_file_info *fi) {
    (void)fi;
    REAL(path);
    return lstat(path_r, st) == -1 ? -errno : 0;
}

static int fb_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                      struct fuse_file_info *fi, enum fuse_readdir_flags flags) {
    (void)off; (void)fi; (void)flags;
    REAL(path);
    DIR *d = opendir(path_r);
    if (d == NULL)
        return -errno;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        struct stat st = {0};
        st.st_ino = e->d_ino;
        st.st_mode = (mode_t)DTTOIF(e->d_type);
        if (fill(buf, e->d_name, &st, 0, 0))
            break;
    }
    closedir(d);
    return 0;
}

static int fb_opendir(const char *path, struct fuse_file_info *fi) {
    (void)fi;
    REAL(path);
    return access(path_r, F_OK) == -1 ? -errno : 0;
}

static int fb_open(const char *path, struct fuse_file_info *fi) {
    char path_r[PATH_MAX];
    gate_op(1);
    real(path_r, path);
    int fd = open(path_r, fi->flags & ~O_NOFOLLOW);
    if (fd == -1)
        return -errno;
    fi->fh = (uint64_t)fd;
    return 0;
}

static int fb_create(const char *path, mode_t mode, struct fuse_file_info *fi) {
    REAL(path);
    int fd = open(path_r, fi->flags, mode);
    if (fd == -1)
        return -errno;
    struct fuse_context *c = fuse_get_context();
    if (fchown(fd, c->uid, c->gid) == -1) { /* the file is the caller's, as on a real fs */
        int err = errno;
        close(fd);
        return -err;
    }
    fi->fh = (uint64_t)fd;
    return 0;
}

static int fb_read(const char *path, char *buf, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)path;
    gate_op(1);
    ssize_t n = pread((int)fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fb_write(const char *path, const char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)path;
    gate();
    ssize_t n = pwrite((int)fi->fh, buf, size, off);
    return n == -1 ? -errno : (int)n;
}

static int fb_release(const char *path, struct fuse_file_info *fi) {
    (void)path;
    close((int)fi->fh);
    return 0;
}

static int fb_mkdir(const char *path, mode_t mode) {
    REAL(path);
    if (mkdir(path_r, mode) == -1)
        return -errno;
    struct fuse_context *c = fuse_get_context();
    return lchown(path_r, c->uid, c->gid) == -1 ? -errno : 0;
}

static int fb_unlink(const char *path) {
    REAL(path);
    return unlink(path_r) == -1 ? -errno : 0;
}

static int fb_rmdir(const char *path) {
    REAL(path);
    return rmdir(path_r) == -1 ? -errno : 0;
}

static int fb_rename(const char *from, const char *to, unsigned int flags) {
    if (flags)
        return -EINVAL;
    REAL(from);
    REAL(to);
    return rename(from_r, to_r) == -1 ? -errno : 0;
}

static int fb_truncate(const char *path, off_t size, struct fuse_file_info *fi) {
    if (fi != NULL) {
        gate();
        return ftruncate((int)fi->fh, size) == -1 ? -errno : 0;
    }
    REAL(path);
    return truncate(path_r, size) == -1 ? -errno : 0;
}

static int fb_utimens(const char *path, const struct timespec tv[2], struct fuse_file_info *fi) {
    (void)fi;
    REAL(path);
    return utimensat(AT_FDCWD, path_r, tv, AT_SYMLINK_NOFOLLOW) == -1 ? -errno : 0;
}

static int fb_chmod(const char *path, mode_t mode, struct fuse_file_info *fi) {
    (void)fi;
    REAL(path);
    return chmod(path_r, mode) == -1 ? -errno : 0;
}

static const struct fuse_operations ops = {
    .getattr = fb_getattr,
    .readdir = fb_readdir,
    .opendir = fb_opendir,
    .open = fb_open,
    .create = fb_create,
    .read = fb_read,
    .write = fb_write,
    .release = fb_release,
    .mkdir = fb_mkdir,
    .unlink = fb_unlink,
    .rmdir = fb_rmdir,
    .rename = fb_rename,
    .truncate = fb_truncate,
    .utimens = fb_utimens,
    .chmod = fb_chmod,
};

int main(int argc, char *argv[]) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s BACKING CONTROL MOUNTPOINT [fuse options]\n", argv[0]);
        return 2;
    }
    static char b[PATH_MAX], c[PATH_MAX];
    if (realpath(argv[1], b) == NULL || realpath(argv[2], c) == NULL) {
        perror("realpath");
        return 2;
    }
    backing = b;
    control = c;
    argv[2] = argv[0];
    return fuse_main(argc - 2, argv + 2, &ops, NULL);
}
