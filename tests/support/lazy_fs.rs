//! A filesystem that forgets every write that was not made durable, for power-loss tests, in the
//! manner of LazyFS (the FUSE filesystem the Jepsen analyses use to drop unsynced data).
//!
//! It is an in-memory FUSE filesystem (the `fuser` crate, mounted without libfuse: as root, directly
//! through /dev/fuse) that keeps two versions of everything:
//! - the *volatile* one, which every operation reads and changes, like the kernel's page cache;
//! - the *durable* one, what a disk would hold after a power cut.
//!
//! What makes what durable, as POSIX promises and no more:
//! - `fsync` or `fdatasync` of a file: its contents and its size (not its name);
//! - `fsync` of a directory: that directory's entries as they are now (creates, renames and
//!   unlinks in it), not the contents of the files they name;
//! - `syncfs` or `sync`: everything. The kernel does not forward either to a FUSE server (it sends
//!   `FUSE_SYNCFS` only to virtiofs and fuseblk servers), so the filesystem cannot see them; a test that runs a program
//!   which calls them installs [`super::syncfs_watch`], which stops each call in the program and
//!   calls [`LazyFs::sync_all`] before letting it go on.
//!
//! `close` (FUSE's flush and release) makes nothing durable, and neither does `statfs`. File
//! attributes other than the size (mode, owner, times) are kept as they are at a power cut: the
//! model is about data and names.
//!
//! [`LazyFs::power_cut`] is the power cut: the caller has killed every process that used the
//! filesystem; it is unmounted, every file and directory goes back to its durable version (and, if
//! asked, the unsynced writes of some files are kept in part, the last of them torn, as when a disk
//! wrote back some pages before the power went), and it is mounted again on the same directory: a
//! fresh mount, so nothing the kernel cached survives either.
#![allow(dead_code)]

use fuser::{
    BackgroundSession, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const ROOT: u64 = 1;

/// How long the kernel may cache names and attributes. Only the kernel changes the tree while it
/// is mounted, so its caches stay right; a power cut remounts, which drops them.
const TTL: Duration = Duration::from_secs(1);

/// What a flush to the disk takes, paid by every fsync before it makes anything durable: so that,
/// as on a real disk, writes are often still unsynced when the power goes, and a power cut during
/// a flush leaves it undone. (Served by several threads: other requests go on meanwhile.)
const SYNC_DELAY: Duration = Duration::from_millis(1);

/// Threads serving requests.
const THREADS: usize = 4;

/// A change to a file's contents not yet made durable, kept in order so that a power cut can keep
/// some of them (torn).
#[derive(Clone, Debug)]
enum Op {
    Write { offset: usize, data: Vec<u8> },
    Truncate(usize),
}

impl Op {
    fn apply(&self, to: &mut Vec<u8>) {
        match self {
            Op::Write { offset, data } => {
                if to.len() < offset + data.len() {
                    to.resize(offset + data.len(), 0);
                }
                to[*offset..offset + data.len()].copy_from_slice(data);
            }
            Op::Truncate(len) => to.resize(*len, 0),
        }
    }
}

enum Body {
    File {
        /// What reads see.
        data: Vec<u8>,
        /// What the disk holds.
        durable: Vec<u8>,
        /// Applied in order to `durable`, they give `data`.
        pending: Vec<Op>,
    },
    Dir {
        entries: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
    },
    Symlink(PathBuf),
    /// A socket or a FIFO: a name and nothing more.
    Special(FileType),
}

struct Node {
    body: Body,
    perm: u16,
    uid: u32,
    gid: u32,
    rdev: u32,
    nlink: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
}

impl Node {
    fn new(body: Body, mode: u32, req: &Request) -> Node {
        let now = SystemTime::now();
        Node {
            body,
            perm: (mode & 0o7777) as u16,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            nlink: 1,
            atime: now,
            mtime: now,
            ctime: now,
        }
    }

    fn kind(&self) -> FileType {
        match &self.body {
            Body::File { .. } => FileType::RegularFile,
            Body::Dir { .. } => FileType::Directory,
            Body::Symlink(_) => FileType::Symlink,
            Body::Special(kind) => *kind,
        }
    }

    fn size(&self) -> u64 {
        match &self.body {
            Body::File { data, .. } => data.len() as u64,
            Body::Symlink(target) => target.as_os_str().len() as u64,
            _ => 0,
        }
    }
}

/// What the filesystem was asked to make durable, and what the last power cut dropped.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub fsync: u64,
    pub fdatasync: u64,
    pub fsyncdir: u64,
    /// `syncfs` or `sync` calls reported by [`super::syncfs_watch`].
    pub sync_all: u64,
    pub writes: u64,
}

/// What a power cut did.
#[derive(Clone, Debug, Default)]
pub struct CutReport {
    /// Files whose unsynced changes were dropped (in whole or in part).
    pub files_reverted: usize,
    /// Octets written but not synced, dropped.
    pub bytes_dropped: usize,
    /// Files of which some unsynced writes were kept, the last one torn.
    pub files_torn: usize,
    /// Directory entries created, renamed or removed without a directory fsync, undone.
    pub names_reverted: usize,
}

/// The two versions of the tree; shared by the mounted filesystem and the test.
pub struct Tree {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Directory listings taken at opendir, so a listing is consistent while the directory changes.
    listings: HashMap<u64, Vec<(u64, FileType, OsString)>>,
    next_fh: u64,
    /// Bumped by each power cut: requests still arriving through an older mount are refused.
    epoch: u64,
    pub counters: Counters,
}

impl Tree {
    fn new() -> Tree {
        let now = SystemTime::now();
        let root = Node {
            body: Body::Dir { entries: BTreeMap::new(), durable: BTreeMap::new() },
            perm: 0o755,
            uid: 0,
            gid: 0,
            rdev: 0,
            nlink: 2,
            atime: now,
            mtime: now,
            ctime: now,
        };
        Tree {
            nodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            listings: HashMap::new(),
            next_fh: 1,
            epoch: 0,
            counters: Counters::default(),
        }
    }

    fn attr(&self, ino: u64) -> Result<FileAttr, Errno> {
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        let size = node.size();
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
            crtime: node.ctime,
            kind: node.kind(),
            perm: node.perm,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            blksize: 4096,
            flags: 0,
        })
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match self.nodes.get(&dir).map(|n| &n.body) {
            Some(Body::Dir { entries, .. }) => Ok(entries),
            Some(_) => Err(Errno::ENOTDIR),
            None => Err(Errno::ENOENT),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> Result<&mut BTreeMap<OsString, u64>, Errno> {
        let node = self.nodes.get_mut(&dir).ok_or(Errno::ENOENT)?;
        node.mtime = SystemTime::now();
        node.ctime = node.mtime;
        match &mut node.body {
            Body::Dir { entries, .. } => Ok(entries),
            _ => Err(Errno::ENOTDIR),
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?.get(name).copied().ok_or(Errno::ENOENT)
    }

    /// Adds a new node under `parent`; the name is volatile until the directory is fsync'd.
    fn insert(&mut self, parent: u64, name: &OsStr, node: Node) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let is_dir = matches!(node.body, Body::Dir { .. });
        self.nodes.insert(ino, node);
        self.entries_mut(parent)?.insert(name.to_os_string(), ino);
        if is_dir && let Some(parent) = self.nodes.get_mut(&parent) {
            parent.nlink += 1;
        }
        Ok(ino)
    }

    /// Removes a name. The node itself stays: a durable entry may still name it, and a power cut
    /// brings it back then.
    fn remove(&mut self, parent: u64, name: &OsStr, want_dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let node = self.nodes.get(&ino).ok_or(Errno::ENOENT)?;
        match (&node.body, want_dir) {
            (Body::Dir { entries, .. }, true) if !entries.is_empty() => return Err(Errno::ENOTEMPTY),
            (Body::Dir { .. }, true) => {}
            (Body::Dir { .. }, false) => return Err(Errno::EISDIR),
            (_, true) => return Err(Errno::ENOTDIR),
            (_, false) => {}
        }
        self.entries_mut(parent)?.remove(name);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlink = node.nlink.saturating_sub(1);
            node.ctime = SystemTime::now();
        }
        if want_dir && let Some(parent) = self.nodes.get_mut(&parent) {
            parent.nlink = parent.nlink.saturating_sub(1);
        }
        Ok(())
    }

    fn rename(&mut self, from: (u64, &OsStr), to: (u64, &OsStr), flags: RenameFlags) -> Result<(), Errno> {
        if flags.contains(RenameFlags::RENAME_EXCHANGE) || flags.contains(RenameFlags::RENAME_WHITEOUT) {
            return Err(Errno::EINVAL);
        }
        let ino = self.lookup(from.0, from.1)?;
        if let Ok(existing) = self.lookup(to.0, to.1) {
            if existing == ino {
                return Ok(());
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            let want_dir = matches!(self.nodes.get(&existing).map(|n| &n.body), Some(Body::Dir { .. }));
            self.remove(to.0, to.1, want_dir)?;
        }
        self.entries_mut(from.0)?.remove(from.1);
        self.entries_mut(to.0)?.insert(to.1.to_os_string(), ino);
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.ctime = SystemTime::now();
        }
        Ok(())
    }

    fn file(&mut self, ino: u64) -> Result<(&mut Vec<u8>, &mut Vec<Op>), Errno> {
        let node = self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?;
        node.mtime = SystemTime::now();
        node.ctime = node.mtime;
        match &mut node.body {
            Body::File { data, pending, .. } => Ok((data, pending)),
            Body::Dir { .. } => Err(Errno::EISDIR),
            _ => Err(Errno::EINVAL),
        }
    }

    fn write(&mut self, ino: u64, offset: usize, bytes: &[u8]) -> Result<(), Errno> {
        self.counters.writes += 1;
        let (data, pending) = self.file(ino)?;
        let op = Op::Write { offset, data: bytes.to_vec() };
        op.apply(data);
        pending.push(op);
        Ok(())
    }

    fn truncate(&mut self, ino: u64, len: usize) -> Result<(), Errno> {
        let (data, pending) = self.file(ino)?;
        let op = Op::Truncate(len);
        op.apply(data);
        pending.push(op);
        Ok(())
    }

    /// fsync or fdatasync of a file (or of a directory, which the kernel sends as fsyncdir).
    fn sync_node(&mut self, ino: u64) -> Result<(), Errno> {
        match &mut self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)?.body {
            Body::File { durable, pending, .. } => {
                for op in pending.drain(..) {
                    op.apply(durable);
                }
            }
            Body::Dir { entries, durable } => durable.clone_from(entries),
            _ => {}
        }
        Ok(())
    }

    /// `syncfs` or `sync`: everything becomes durable.
    pub fn sync_all(&mut self) {
        self.counters.sync_all += 1;
        let all: Vec<u64> = self.nodes.keys().copied().collect();
        for ino in all {
            let _ = self.sync_node(ino);
        }
    }

    /// Every file and directory goes back to its durable version; with `tear`, some files keep a
    /// prefix of their unsynced writes, the last one cut at a random octet. Nodes no durable name
    /// reaches are dropped.
    fn revert(&mut self, tear: Option<&mut fastrand::Rng>) -> CutReport {
        let mut report = CutReport::default();
        let mut rng = tear;
        for node in self.nodes.values_mut() {
            match &mut node.body {
                Body::File { data, durable, pending } if !pending.is_empty() => {
                    report.files_reverted += 1;
                    let before = data.len();
                    if let Some(rng) = rng.as_deref_mut()
                        && rng.bool()
                    {
                        report.files_torn += 1;
                        let kept = rng.usize(..pending.len());
                        for op in &pending[..kept] {
                            op.apply(durable);
                        }
                        match &pending[kept] {
                            Op::Write { offset, data } => {
                                let cut = rng.usize(..=data.len());
                                Op::Write { offset: *offset, data: data[..cut].to_vec() }.apply(durable);
                            }
                            truncate => truncate.apply(durable),
                        }
                    }
                    report.bytes_dropped += before.saturating_sub(durable.len());
                    data.clone_from(durable);
                    pending.clear();
                }
                Body::Dir { entries, durable } if entries != durable => {
                    let now: HashSet<_> = entries.iter().collect();
                    let then: HashSet<_> = durable.iter().collect();
                    report.names_reverted += now.symmetric_difference(&then).count();
                    entries.clone_from(durable);
                }
                _ => {}
            }
        }
        self.collect();
        self.listings.clear();
        self.epoch += 1;
        report
    }

    /// Drops the nodes no name reaches from the root and recounts links.
    fn collect(&mut self) {
        let mut links: HashMap<u64, u32> = HashMap::from([(ROOT, 2)]);
        let mut todo = vec![ROOT];
        while let Some(dir) = todo.pop() {
            let Ok(entries) = self.entries(dir) else { continue };
            let children: Vec<u64> = entries.values().copied().collect();
            for child in children {
                let is_dir = matches!(self.nodes.get(&child).map(|n| &n.body), Some(Body::Dir { .. }));
                let first = !links.contains_key(&child);
                *links.entry(child).or_insert(if is_dir { 1 } else { 0 }) += 1;
                if is_dir {
                    *links.entry(dir).or_insert(2) += 1;
                }
                if first && is_dir {
                    todo.push(child);
                }
            }
        }
        self.nodes.retain(|ino, _| links.contains_key(ino));
        for (ino, node) in &mut self.nodes {
            node.nlink = links.get(ino).copied().unwrap_or(1);
        }
    }

    fn handle(&mut self) -> u64 {
        self.next_fh += 1;
        self.next_fh
    }
}

/// The filesystem as mounted once; refuses requests after a power cut (a new mount serves then).
struct Mounted {
    tree: Arc<Mutex<Tree>>,
    epoch: u64,
}

impl Mounted {
    fn tree(&self) -> Result<MutexGuard<'_, Tree>, Errno> {
        let tree = self.tree.lock().unwrap_or_else(|p| p.into_inner());
        if tree.epoch == self.epoch { Ok(tree) } else { Err(Errno::EIO) }
    }

    fn entry(&self, reply: ReplyEntry, made: impl FnOnce(&mut Tree) -> Result<u64, Errno>) {
        let result = self.tree().and_then(|mut tree| {
            let ino = made(&mut tree)?;
            tree.attr(ino)
        });
        match result {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(err) => reply.error(err),
        }
    }

    fn empty(&self, reply: ReplyEmpty, done: impl FnOnce(&mut Tree) -> Result<(), Errno>) {
        match self.tree().and_then(|mut tree| done(&mut tree)) {
            Ok(()) => reply.ok(),
            Err(err) => reply.error(err),
        }
    }
}

fn special_kind(mode: u32) -> Option<FileType> {
    match mode & libc::S_IFMT {
        libc::S_IFREG => None,
        libc::S_IFSOCK => Some(FileType::Socket),
        libc::S_IFIFO => Some(FileType::NamedPipe),
        libc::S_IFCHR => Some(FileType::CharDevice),
        libc::S_IFBLK => Some(FileType::BlockDevice),
        _ => None,
    }
}

fn new_file() -> Body {
    Body::File { data: Vec::new(), durable: Vec::new(), pending: Vec::new() }
}

fn time(value: TimeOrNow) -> SystemTime {
    match value {
        TimeOrNow::SpecificTime(time) => time,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for Mounted {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |tree| tree.lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.tree().and_then(|tree| tree.attr(ino.0)) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result = self.tree().and_then(|mut tree| {
            if let Some(size) = size {
                tree.truncate(ino.0, usize::try_from(size).map_err(|_| Errno::EFBIG)?)?;
            }
            let node = tree.nodes.get_mut(&ino.0).ok_or(Errno::ENOENT)?;
            if let Some(mode) = mode {
                node.perm = (mode & 0o7777) as u16;
            }
            node.uid = uid.unwrap_or(node.uid);
            node.gid = gid.unwrap_or(node.gid);
            node.atime = atime.map(time).unwrap_or(node.atime);
            node.mtime = mtime.map(time).unwrap_or(node.mtime);
            node.ctime = SystemTime::now();
            tree.attr(ino.0)
        });
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(err) => reply.error(err),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let result = self.tree().and_then(|tree| match tree.nodes.get(&ino.0).map(|n| &n.body) {
            Some(Body::Symlink(target)) => Ok(target.as_os_str().as_encoded_bytes().to_vec()),
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        });
        match result {
            Ok(target) => reply.data(&target),
            Err(err) => reply.error(err),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        self.entry(reply, |tree| {
            let body = special_kind(mode).map(Body::Special).unwrap_or_else(new_file);
            let mut node = Node::new(body, mode & !umask, req);
            node.rdev = rdev;
            tree.insert(parent.0, name, node)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.entry(reply, |tree| {
            let mut node =
                Node::new(Body::Dir { entries: BTreeMap::new(), durable: BTreeMap::new() }, mode & !umask, req);
            node.nlink = 2;
            tree.insert(parent.0, name, node)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |tree| tree.remove(parent.0, name, false));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(reply, |tree| tree.remove(parent.0, name, true));
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.entry(reply, |tree| tree.insert(parent.0, link_name, Node::new(Body::Symlink(target.into()), 0o777, req)));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(reply, |tree| tree.rename((parent.0, name), (newparent.0, newname), flags));
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        self.entry(reply, |tree| {
            if matches!(tree.nodes.get(&ino.0).map(|n| &n.body), Some(Body::Dir { .. }) | None) {
                return Err(Errno::EPERM);
            }
            if tree.entries(newparent.0)?.contains_key(newname) {
                return Err(Errno::EEXIST);
            }
            tree.entries_mut(newparent.0)?.insert(newname.to_os_string(), ino.0);
            if let Some(node) = tree.nodes.get_mut(&ino.0) {
                node.nlink += 1;
            }
            Ok(ino.0)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.tree().and_then(|mut tree| match tree.nodes.get(&ino.0).map(|n| &n.body) {
            Some(Body::Dir { .. }) => Err(Errno::EISDIR),
            Some(_) => Ok(tree.handle()),
            None => Err(Errno::ENOENT),
        });
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(err),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.tree().and_then(|tree| match tree.nodes.get(&ino.0).map(|n| &n.body) {
            Some(Body::File { data, .. }) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX).min(data.len());
                let end = start.saturating_add(size as usize).min(data.len());
                Ok(data[start..end].to_vec())
            }
            Some(_) => Err(Errno::EINVAL),
            None => Err(Errno::ENOENT),
        });
        match result {
            Ok(data) => reply.data(&data),
            Err(err) => reply.error(err),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let result = self
            .tree()
            .and_then(|mut tree| tree.write(ino.0, usize::try_from(offset).map_err(|_| Errno::EFBIG)?, data));
        match result {
            Ok(()) => reply.written(data.len() as u32),
            Err(err) => reply.error(err),
        }
    }

    /// Called on every close: makes nothing durable (close(2) promises nothing of the kind).
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        std::thread::sleep(SYNC_DELAY);
        self.empty(reply, |tree| {
            if datasync {
                tree.counters.fdatasync += 1;
            } else {
                tree.counters.fsync += 1;
            }
            tree.sync_node(ino.0)
        });
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.tree().and_then(|mut tree| {
            // Nothing reads the inode number of "..": the root's will do.
            let mut listing = vec![(ino.0, FileType::Directory, ".".into()), (ROOT, FileType::Directory, "..".into())];
            for (name, &child) in tree.entries(ino.0)? {
                let kind = tree.nodes.get(&child).map(Node::kind).unwrap_or(FileType::RegularFile);
                listing.push((child, kind, name.clone()));
            }
            let fh = tree.handle();
            tree.listings.insert(fh, listing);
            Ok(fh)
        });
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(err),
        }
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let tree = match self.tree() {
            Ok(tree) => tree,
            Err(err) => return reply.error(err),
        };
        let Some(listing) = tree.listings.get(&fh.0) else { return reply.error(Errno::EBADF) };
        for (i, (ino, kind, name)) in listing.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), i as u64 + 1, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        if let Ok(mut tree) = self.tree() {
            tree.listings.remove(&fh.0);
        }
        reply.ok();
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        std::thread::sleep(SYNC_DELAY);
        self.empty(reply, |tree| {
            tree.counters.fsyncdir += 1;
            tree.sync_node(ino.0)
        });
    }

    /// Plenty of room: the tests that need a full disk use a small tmpfs instead.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 24, 1 << 24, 1 << 24, 1 << 22, 1 << 22, 4096, 255, 4096);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.tree().and_then(|mut tree| {
            let body = special_kind(mode).map(Body::Special).unwrap_or_else(new_file);
            let ino = tree.insert(parent.0, name, Node::new(body, mode & !umask, req))?;
            Ok((tree.attr(ino)?, tree.handle()))
        });
        match result {
            Ok((attr, fh)) => reply.created(&TTL, &attr, Generation(0), FileHandle(fh), FopenFlags::empty()),
            Err(err) => reply.error(err),
        }
    }
}

/// A [`Tree`] mounted on a directory; unmounted on drop (also when a test panics).
pub struct LazyFs {
    tree: Arc<Mutex<Tree>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl LazyFs {
    /// Mounts an empty filesystem on `mountpoint` (an existing, empty directory). Panics with the
    /// reason if FUSE is not there: a power-loss test must not pass without its filesystem.
    pub fn mount(mountpoint: &Path) -> LazyFs {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the power-loss test needs FUSE (the `fuse` kernel module; in a container, \
             the /dev/fuse device) and root to mount it"
        );
        let mut fs =
            LazyFs { tree: Arc::new(Mutex::new(Tree::new())), mountpoint: mountpoint.to_path_buf(), session: None };
        fs.attach();
        fs
    }

    fn attach(&mut self) {
        let epoch = self.tree().epoch;
        let mut config = fuser::Config::default();
        config.mount_options = vec![fuser::MountOption::FSName("lazyfs".into())];
        config.n_threads = Some(THREADS);
        let mounted = Mounted { tree: Arc::clone(&self.tree), epoch };
        let session = fuser::spawn_mount(mounted, &self.mountpoint, &config).unwrap_or_else(|err| {
            panic!(
                "cannot mount the power-loss filesystem on {} (needs root and /dev/fuse): {err}",
                self.mountpoint.display()
            )
        });
        self.session = Some(session);
    }

    fn detach(&mut self) {
        let Some(session) = self.session.take() else { return };
        if let Err(err) = session.umount_and_join() {
            // Busy: someone still has a file open. Detach it from the tree anyway, so the directory
            // is free; the old mount refuses every request from now on (see `Mounted`).
            eprintln!("lazyfs: unmount of {} failed ({err}); detaching it", self.mountpoint.display());
            self.tree().epoch += 1;
            if let Ok(path) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid NUL-terminated path.
                unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    pub fn tree(&self) -> MutexGuard<'_, Tree> {
        self.tree.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes everything durable, as `syncfs` would (for a watcher of the program's syncfs calls).
    pub fn syncer(&self) -> impl Fn() + Send + Sync + 'static {
        let tree = Arc::clone(&self.tree);
        move || tree.lock().unwrap_or_else(|p| p.into_inner()).sync_all()
    }

    pub fn sync_all(&self) {
        self.tree().sync_all();
    }

    pub fn counters(&self) -> Counters {
        self.tree().counters.clone()
    }

    /// The power cut (see the module docs). Every process using the filesystem must be dead.
    pub fn power_cut(&mut self, tear: Option<&mut fastrand::Rng>) -> CutReport {
        self.detach();
        let report = self.tree().revert(tear);
        self.attach();
        report
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_synced_data_and_names_survive_a_power_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fs = LazyFs::mount(dir.path());
        let root = dir.path();
        std::fs::write(root.join("a"), b"unsynced").expect("write a");
        let file = std::fs::File::create(root.join("b")).expect("create b");
        std::io::Write::write_all(&mut &file, b"synced").expect("write b");
        file.sync_data().expect("fdatasync b");
        std::io::Write::write_all(&mut &file, b" and more").expect("write b again");
        drop(file);
        std::fs::File::open(root).and_then(|d| d.sync_all()).expect("fsync root");
        std::fs::write(root.join("c"), b"no name")
            .and_then(|()| std::fs::File::open(root.join("c"))?.sync_all())
            .expect("c");
        let report = fs.power_cut(None);
        assert_eq!(std::fs::read(root.join("a")).expect("a survives by name"), b"");
        assert_eq!(std::fs::read(root.join("b")).expect("b survives"), b"synced");
        assert!(!root.join("c").exists(), "c was never in a synced directory");
        assert_eq!((report.files_reverted, report.names_reverted), (2, 1), "{report:?}");
    }
}
