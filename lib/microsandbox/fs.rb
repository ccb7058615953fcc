# frozen_string_literal: true

module Microsandbox
  # Kind predicates shared by {FsEntry} and {FsMetadata} (both have `#kind`).
  module FsKind
    # @return [Symbol] :file, :directory, :symlink or :other (the reference gem's name
    #   for `#kind`)
    def type = kind

    # @return [Boolean]
    def file? = kind == :file
    # @return [Boolean]
    def directory? = kind == :directory
    # @return [Boolean]
    def symlink? = kind == :symlink
  end

  # One entry of {FS#list}.
  class FsEntry
    # @return [String] file name, exactly: UTF-8 when its bytes are UTF-8, else a binary
    #   (ASCII-8BIT) String with the raw bytes. Either form names the file when passed back.
    attr_reader :name
    # @return [String] absolute guest path (UTF-8 or binary, like {#name})
    attr_reader :path
    # @return [Symbol] :file, :directory, :symlink or :other (symlinks are not followed)
    attr_reader :kind
    # @return [Integer] size in bytes
    attr_reader :size
    # @return [Integer] permission bits (`mode & 07777`)
    attr_reader :mode
    # @return [Time] modification time
    attr_reader :modified

    # @api private
    def initialize(name:, path:, kind:, size:, mode:, modified: nil)
      @name = name
      @path = path
      @kind = kind
      @size = size
      @mode = mode
      @modified = modified
      freeze
    end

    include FsKind

    # @return [String]
    def inspect
      format("#<%s %s %s %d bytes mode=%04o>", self.class.name, path, kind, size, mode)
    end
  end

  # Metadata of a guest path ({FS#stat}; like `lstat`, symlinks are not followed).
  class FsMetadata
    # @return [Symbol] :file, :directory, :symlink or :other
    attr_reader :kind
    # @return [Integer]
    attr_reader :size
    # @return [Integer] permission bits (`mode & 07777`)
    attr_reader :mode
    # @return [Integer]
    attr_reader :uid
    # @return [Integer]
    attr_reader :gid
    # @return [Time] modification time
    attr_reader :mtime
    # @return [Time, nil] creation (birth) time; nil when the guest filesystem does not
    #   record one
    attr_reader :created

    # @api private
    def initialize(kind:, size:, mode:, uid:, gid:, mtime:, created: nil)
      @kind = kind
      @size = size
      @mode = mode
      @uid = uid
      @gid = gid
      @mtime = mtime
      @created = created
      freeze
    end

    include FsKind

    # @return [Time] modification time (the reference gem's name for {#mtime})
    def modified = mtime

    # @return [Boolean] true when no write permission bit is set (`mode & 0o222 == 0`),
    #   as Rust's `Permissions#readonly` and so the reference gem define it
    def readonly?
      (mode & 0o222).zero?
    end

    # @return [String]
    def inspect
      format("#<%s %s %d bytes mode=%04o uid=%d gid=%d mtime=%s>", self.class.name, kind, size, mode, uid, gid, mtime)
    end
  end

  # A guest file being downloaded in chunks (see {FS#read_stream}). Enumerable over
  # binary String chunks of at most 4 MiB; single consumer. Leaving `each` early or
  # calling {#close} cancels the transfer.
  #
  # Belongs to the process that opened it: in a forked child, reading raises
  # {InheritedHandleError} and {#close} does nothing.
  class FsReadStream
    include Enumerable

    # @api private
    def initialize(native)
      @native = native
    end

    # Yields each chunk (ASCII-8BIT String) until the end of the file.
    # @yieldparam chunk [String]
    # @return [self, Enumerator]
    # @raise [FilesystemError] e.g. the file does not exist
    def each
      return enum_for(:each) unless block_given?

      begin
        while (chunk = @native.next_chunk)
          yield chunk
        end
      ensure
        close
      end
      self
    end

    # Reads the rest of the file into one String (it must fit in memory: prefer {#each}
    # for large files).
    # @return [String] ASCII-8BIT
    # @raise [FilesystemError]
    def read
      out = +"".b
      each { |chunk| out << chunk }
      out
    end

    # The next chunk, or nil at the end of the file.
    # @return [String, nil]
    def read_chunk
      @native.next_chunk
    end

    # Cancels the download if it still runs. Idempotent.
    # @return [nil]
    def close
      @native.close
      nil
    end
  end

  # The writing end of {FS#write_stream}: bytes written here are uploaded as they come.
  # Belongs to the process that opened it: in a forked child, {#write} and {#finish} raise
  # {InheritedHandleError} and {#abort} does nothing.
  class FsWriteSink
    # @api private
    def initialize(native)
      @native = native
      @written = 0
      @closed = false
    end

    # @return [Integer] bytes accepted so far
    attr_reader :written

    # Appends bytes to the guest file (waits while the guest is behind).
    # @param data [String]
    # @return [Integer] bytes written
    # @raise [TypeError] data is not a String (nor converts to one with `#to_str`)
    # @raise [FilesystemError] the guest failed (e.g. disk full)
    def write(data)
      data = Microsandbox.coerce_write_bytes(data)
      @native.write(data) # the native side copies the bytes, whatever the encoding
      @written += data.bytesize
      data.bytesize
    end

    # @param data [String]
    # @return [self]
    def <<(data)
      write(data)
      self
    end

    # Completes the upload.
    # @return [Integer] bytes in the file
    # @raise [FilesystemError] the guest failed, or the sink was already closed or aborted
    def finish
      bytes = @native.finish
      @closed = true
      bytes
    end

    # Completes the upload (the reference gem's name for {#finish}). Idempotent: closing a
    # sink that is already complete or abandoned does nothing.
    # @return [nil]
    # @raise [FilesystemError] the guest failed to complete the file
    def close
      finish unless @closed
      nil
    end

    # Abandons the upload (the guest file keeps what was written). Idempotent.
    # @return [nil]
    def abort
      @closed = true
      @native.close
      nil
    end
  end

  # The guest filesystem of a running sandbox ({Sandbox#fs}). Paths are absolute guest
  # paths and, like Linux names, bytes: any String works, UTF-8 or binary (`"/tmp/a\xFF".b`);
  # only NUL is refused. Names from {#list} come back exact. Data is binary-safe. Each call is its own session: calls may run concurrently
  # from several threads, and `Thread#kill`/`Timeout.timeout` cancel them.
  #
  # Errors in the guest raise {FilesystemError} whose message names the path and the
  # errno (e.g. "ENOENT (No such file or directory)") and whose {FilesystemError#errno}
  # is the guest errno.
  #
  # @example
  #   sb.fs.write("/tmp/hello.txt", "hi")
  #   sb.fs.read_text("/tmp/hello.txt") # => "hi"
  #   sb.fs.list("/tmp").map(&:name)    # => ["hello.txt"]
  class FS
    # @api private
    def initialize(native)
      @native = native
    end

    # The whole file as a binary String. Files over 256 MiB raise: use {#read_stream}.
    # @param path [String]
    # @return [String] ASCII-8BIT
    def read(path)
      @native.fs_read(guest_path!(path))
    end

    # The whole file as a UTF-8 String. The guest's bytes are never replaced or dropped:
    # a file that is not valid UTF-8 raises (read its bytes with {#read}), so the String
    # returned is always valid (`=~`, `split` and friends cannot raise on it later).
    # @param path [String]
    # @return [String] UTF-8
    # @raise [FilesystemError] the file is not valid UTF-8
    def read_text(path)
      Microsandbox.utf8_text(read(path), path, "fs.read")
    end

    # Creates or truncates a file and writes `data` to it.
    # @param path [String]
    # @param data [String] bytes (any encoding; written as is)
    # @return [Integer] bytes written
    # @raise [TypeError] data is not a String (nor converts to one with `#to_str`)
    def write(path, data)
      path = guest_path!(path)
      data = Microsandbox.coerce_write_bytes(data)
      @native.fs_write(path, data) # the native side copies the bytes
    end

    # @param path [String]
    # @return [Boolean] whether the path exists (following symlinks)
    def exists?(path)
      @native.fs_exists(guest_path!(path))
    end

    # Creates a directory.
    # @param path [String]
    # @param parents [Boolean] create missing parents too, and accept an existing directory
    # @return [nil]
    def mkdir(path, parents: true)
      @native.fs_mkdir(guest_path!(path), parents ? true : false)
    end

    # Removes a file, symlink or empty directory.
    # @param path [String]
    # @param recursive [Boolean] remove a directory and everything in it
    # @return [nil]
    def remove(path, recursive: false)
      @native.fs_remove(guest_path!(path), recursive ? true : false)
    end

    # Removes a directory and everything in it (`remove(path, recursive: true)`).
    # @param path [String]
    # @return [nil]
    # @raise [FilesystemError] e.g. the path does not exist
    def remove_dir(path)
      remove(path, recursive: true)
    end

    # Copies a file inside the guest (contents and permission bits).
    # @param src [String]
    # @param dst [String]
    # @return [nil]
    def copy(src, dst)
      @native.fs_copy(guest_path!(src, "src"), guest_path!(dst, "dst"))
    end

    # Renames (moves) a path inside the guest.
    # @param src [String]
    # @param dst [String]
    # @return [nil]
    def rename(src, dst)
      @native.fs_rename(guest_path!(src, "src"), guest_path!(dst, "dst"))
    end

    # Entries of a directory, sorted by name (at most 100,000).
    # @param path [String]
    # @return [Array<FsEntry>]
    def list(path)
      dir = guest_path!(path)
      base = dir.end_with?("/") ? dir : "#{dir}/"
      @native.fs_list(dir).map do |name, kind, size, mode, sec, nsec|
        FsEntry.new(name: name, path: FS.join_bytes(base, name), kind: kind, size: size, mode: mode,
                    modified: Time.at(sec, nsec, :nsec))
      end
    end

    # Metadata of a path (symlinks are not followed).
    # @param path [String]
    # @return [FsMetadata]
    def stat(path)
      kind, size, mode, uid, gid, sec, nsec, bsec, bnsec = @native.fs_stat(guest_path!(path))
      FsMetadata.new(kind: kind, size: size, mode: mode, uid: uid, gid: gid, mtime: Time.at(sec, nsec, :nsec),
                     created: bsec && Time.at(bsec, bnsec || 0, :nsec))
    end

    # Uploads a host file, streaming (memory stays bounded whatever its size).
    # @param host_path [String]
    # @param guest_path [String]
    # @return [Integer] bytes copied
    def copy_from_host(host_path, guest_path)
      @native.fs_copy_from_host(host_path!(host_path), guest_path!(guest_path, "guest_path"))
    end

    # Downloads a guest file to the host, streaming. A failed download leaves no file.
    # @param guest_path [String]
    # @param host_path [String]
    # @return [Integer] bytes copied
    def copy_to_host(guest_path, host_path)
      @native.fs_copy_to_host(guest_path!(guest_path, "guest_path"), host_path!(host_path))
    end

    # Reads a file in chunks (at most 4 MiB each), for files larger than memory.
    # With a block, yields each chunk and returns the byte count; without, returns an
    # Enumerable {FsReadStream}.
    # @param path [String]
    # @yieldparam chunk [String] ASCII-8BIT
    # @return [Integer, FsReadStream]
    def read_stream(path)
      stream = FsReadStream.new(@native.fs_read_stream(guest_path!(path)))
      return stream unless block_given?

      total = 0
      stream.each do |chunk|
        total += chunk.bytesize
        yield chunk
      end
      total
    end

    # Creates or truncates a file and uploads what is written to the sink.
    # With a block, yields the {FsWriteSink}, completes the upload when the block returns
    # and returns the block's value (as the reference gem does; {FsWriteSink#written} has
    # the byte count). If the block raises, the upload is abandoned instead of completed
    # (the file keeps what was written) and the exception propagates. Without a block,
    # returns the sink: complete it with {FsWriteSink#close} (or {FsWriteSink#finish}).
    # @param path [String]
    # @yieldparam sink [FsWriteSink]
    # @return [Object, FsWriteSink] the block's value, or the sink
    def write_stream(path)
      sink = FsWriteSink.new(@native.fs_write_stream(guest_path!(path)))
      return sink unless block_given?

      begin
        value = yield sink
      rescue Exception # rubocop:disable Lint/RescueException
        sink.abort
        raise
      end
      sink.close
      value
    end

    # @return [String]
    def inspect
      "#<#{self.class.name}>"
    end

    private

    # The path's bytes (a binary String): guest names are bytes, so any encoding is
    # accepted (an encoding that is not ASCII-compatible, like UTF-16, is converted to
    # UTF-8 first, as the name's characters are meant).
    def guest_path!(path, name = "path")
      path = path.to_path if path.respond_to?(:to_path) # a Pathname, as the reference gem takes
      path = Validate.string!(name, path)
      path = path.encode(Encoding::UTF_8) unless path.encoding.ascii_compatible?
      raw = path.b
      raise InvalidConfigError, "#{name} must not contain NUL bytes" if raw.include?("\0")
      raise InvalidConfigError, "#{name} must be an absolute guest path (got #{path.inspect})" unless raw.start_with?("/")

      raw
    end

    # An absolute host path as bytes (host names are bytes too).
    def host_path!(path)
      path = Validate.string!("host_path", path.respond_to?(:to_path) ? path.to_path : path)
      raise InvalidConfigError, "host_path must not contain NUL bytes" if path.b.include?("\0")

      return path.b if path.b.start_with?("/")

      begin
        File.expand_path(path).b # relative and "~" forms, as before
      rescue EncodingError
        FS.join_bytes("#{Dir.pwd}/", path).b
      end
    end

    # @api private
    # `a` + `b` by bytes: UTF-8 when the result is valid UTF-8, else binary.
    def self.join_bytes(a, b)
      raw = a.b + b.b
      utf8 = raw.dup.force_encoding(Encoding::UTF_8)
      utf8.valid_encoding? ? utf8 : raw
    end
  end
end
