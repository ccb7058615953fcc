# frozen_string_literal: true

require "json"

module Microsandbox
  # Snapshots: the root disk of a stopped sandbox saved as an artifact — a directory with
  # `manifest.json` and `disk.raw` (sparse) — that new sandboxes boot from
  # (`Sandbox.create(name, from_snapshot: "snap")`). Named snapshots live in
  # `<home>/snapshots/<name>/`; `path:` puts one anywhere. The home keeps an index of the
  # artifacts it made or imported ({list}, {get} by digest, {reindex}).
  #
  # The disk is flattened (it does not depend on the image or a parent snapshot) and is
  # identified by digests: {SnapshotInfo#digest} (the SHA-256 of the manifest, which
  # includes the BLAKE3 of the disk's content). Every boot from a snapshot hashes the disk's data first:
  # a truncated or modified artifact raises {SnapshotIntegrityError} and never boots. The
  # image is never needed (nor pulled), so {SnapshotImageMissingError} is not raised.
  #
  # @example
  #   Microsandbox::Sandbox.create("base", image: "alpine") { |sb| sb.shell("apk add git") }
  #   Microsandbox::Snapshot.create("base", name: "with-git")
  #   Microsandbox::Sandbox.create("job", from_snapshot: "with-git") { |sb| sb.shell("git --version") }
  class Snapshot
    class << self
      # Saves the disk of a stopped sandbox.
      # @param source_sandbox [String, Sandbox, SandboxHandle] the sandbox (or its name)
      # @param name [String, nil] store under `<home>/snapshots/<name>` (default: the
      #   sandbox's name, when `path:` is not given)
      # @param path [String, nil] an artifact directory anywhere instead
      # @param labels [Hash{String=>String}, nil]
      # @param force [Boolean] replace an existing snapshot at the destination
      # @param record_integrity [Boolean] report the content digest in {verify}
      #   (`:verified`); the digest is always checked before a boot
      # @return [SnapshotInfo]
      # @raise [SnapshotSandboxRunningError] the sandbox is not stopped
      # @raise [SnapshotAlreadyExistsError] the destination exists (without `force: true`)
      # @raise [SandboxNotFoundError, InvalidConfigError]
      def create(source_sandbox, name: nil, path: nil, labels: nil, force: false, record_integrity: false)
        sandbox = source_sandbox.respond_to?(:name) ? source_sandbox.name : Validate.string!("source_sandbox", source_sandbox)
        opts = { "labels" => Validate.env!("labels", Validate.coerce_values!("labels", labels)).to_h,
                 "force" => force ? true : false, "record_integrity" => record_integrity ? true : false }
        opts["name"] = Validate.string!("name", name) if name
        opts["path"] = File.expand_path(Validate.string!("path", path)) if path
        SnapshotInfo.new(call("create", "sandbox" => sandbox, "options" => opts))
      end

      # @param name_or_path [String] a snapshot name or an artifact directory
      # @return [SnapshotInfo]
      # @raise [SnapshotNotFoundError, SnapshotIntegrityError] (the manifest was modified)
      def open(name_or_path)
        SnapshotInfo.new(call("open", "key" => key!(name_or_path)))
      end

      # @param name_or_digest [String] a name, a digest ("sha256:…") or a path
      # @return [SnapshotInfo]
      # @raise [SnapshotNotFoundError]
      def get(name_or_digest)
        SnapshotInfo.new(call("get", "key" => key!(name_or_digest)))
      end

      # The indexed snapshots: those this home created or imported (under
      # `<home>/snapshots` or at a `path:`), and those {reindex} found; an artifact that no
      # longer opens is left out.
      # @return [Array<SnapshotInfo>]
      def list
        call("list").map { |h| SnapshotInfo.new(h) }
      end

      # The artifacts directly inside `dir`.
      # @param dir [String]
      # @return [Array<SnapshotInfo>]
      def list_dir(dir)
        call("list_dir", "dir" => File.expand_path(Validate.string!("dir", dir))).map { |h| SnapshotInfo.new(h) }
      end

      # Rebuilds the home's snapshot index from the artifacts in `dir` (default
      # `<home>/snapshots`): artifacts found there that the index lacks (copied in by hand,
      # unpacked by another tool) are added; entries whose artifact is gone or damaged —
      # in `dir` or anywhere else — are dropped. {list} and {get} by digest read the index;
      # {create} and {import} add to it, {remove} drops from it.
      # @param dir [String, nil] a directory of artifacts
      # @return [Integer] how many snapshots the index holds afterwards (`list.size`)
      # @raise [InvalidConfigError] `dir` is not a directory
      # @raise [HostIOError] the directory or index cannot be read or written
      def reindex(dir = nil)
        args = dir.nil? ? {} : { "dir" => File.expand_path(Validate.string!("dir", dir)) }
        call("reindex", args)
      end

      # Deletes an artifact.
      # @param name_or_path [String]
      # @param force [Boolean] also when sandboxes are built on it (they cannot start again)
      # @return [nil]
      # @raise [SnapshotNotFoundError]
      # @raise [InvalidConfigError] sandboxes are built on it (without `force: true`)
      def remove(name_or_path, force: false)
        call("remove", "key" => key!(name_or_path), "force" => force ? true : false)
        nil
      end

      # Hashes the disk and compares it with the manifest.
      # @param name_or_path [String]
      # @return [SnapshotVerifyReport]
      # @raise [SnapshotIntegrityError] the disk or manifest does not match
      def verify(name_or_path)
        SnapshotVerifyReport.new(call("verify", "key" => key!(name_or_path)))
      end

      # Writes the artifact as one plain tar file (manifest + disk), checked first.
      # @param name_or_path [String]
      # @param out_path [String]
      # @param with_parents [Boolean] accepted; the disk is flattened, so there are no
      #   parents to include
      # @param with_image [Boolean] accepted; the disk already holds the image's files
      # @param plain_tar [Boolean] accepted; the archive is always a plain tar
      # @return [nil]
      def export(name_or_path, out_path, with_parents: false, with_image: false, plain_tar: false)
        _ = [with_parents, with_image, plain_tar]
        call("export", "key" => key!(name_or_path), "out" => File.expand_path(Validate.string!("out_path", out_path)))
        nil
      end

      # Unpacks an archive from {export} (only its two files are accepted) and checks it
      # whole before it appears.
      # @param archive_path [String]
      # @param dest [String, nil] artifact directory (default `<home>/snapshots/<its name>`)
      # @return [SnapshotInfo]
      # @raise [SnapshotIntegrityError] not an intact snapshot archive
      # @raise [SnapshotAlreadyExistsError]
      def import(archive_path, dest: nil)
        args = { "archive" => File.expand_path(Validate.string!("archive_path", archive_path)) }
        args["dest"] = File.expand_path(Validate.string!("dest", dest)) if dest
        SnapshotInfo.new(call("import", args))
      end

      private

      def key!(key)
        key = key.to_path if key.respond_to?(:to_path)
        key = Validate.string!("name_or_path", key)
        key.start_with?("~") ? File.expand_path(key) : key
      end

      def call(op, args = {})
        JSON.parse(Native.snapshot(Microsandbox.home, op, JSON.generate(args)))
      end
    end
  end

  # A snapshot artifact as found (manifest fields).
  class SnapshotInfo
    # @return [String] "sha256:…" of the manifest (the snapshot's identity)
    attr_reader :digest
    # @return [String] the artifact directory
    attr_reader :path
    # @return [String, nil]
    attr_reader :name
    # @return [String, nil] digest of the snapshot the source sandbox was booted from
    attr_reader :parent_digest
    # @return [String, nil] the source sandbox's image reference (or local root path)
    attr_reader :image_ref
    # @return [String, nil] "sha256:…" of the image's OCI manifest (nil for a local root)
    attr_reader :image_manifest_digest
    # @return [String] "ext4"
    attr_reader :fstype
    # @return [String, nil]
    attr_reader :source_sandbox
    # @return [Hash{String=>String}]
    attr_reader :labels
    # @return [Integer] bytes of data stored (the disk's non-zero 64 KiB blocks; format-1
    #   artifacts: bytes of the disk file)
    attr_reader :size_bytes
    # @return [Symbol] :raw (format-1 artifacts: :qcow2)
    attr_reader :format
    # @return [Time]
    attr_reader :created_at

    # @api private
    def initialize(h)
      @digest = h.fetch("digest")
      @path = h.fetch("path")
      @name = h["name"]
      @parent_digest = h["parent_digest"]
      @image_ref = h["image_ref"]
      @image_manifest_digest = h["image_manifest_digest"]
      @fstype = h["fstype"]
      @source_sandbox = h["source_sandbox"]
      @labels = (h["labels"] || {}).freeze
      @size_bytes = h["size_bytes"]
      @format = h["format"]&.to_sym
      @created_at = Time.at(h.fetch("created_at"))
      freeze
    end

    # @return [SnapshotInfo] read again from its directory
    def open = Snapshot.open(path)

    # @param force [Boolean]
    # @return [nil]
    def remove(force: false) = Snapshot.remove(path, force: force)

    # @return [String]
    def inspect
      "#<#{self.class.name} #{name || path} #{digest[0, 19]}… #{size_bytes} bytes>"
    end
  end

  # {Snapshot.verify}'s answer (a mismatch raises {SnapshotIntegrityError} instead).
  class SnapshotVerifyReport
    # @return [String]
    attr_reader :digest
    # @return [String]
    attr_reader :path
    # @return [Symbol] :verified (integrity was recorded at create) or :not_recorded
    attr_reader :status
    # @return [String, nil] "blake3" when recorded ("sha256" for older artifacts)
    attr_reader :algorithm
    # @return [String, nil] the disk's digest when recorded
    attr_reader :content_digest

    # @api private
    def initialize(h)
      @digest = h.fetch("digest")
      @path = h.fetch("path")
      @status = h.fetch("status").to_sym
      @algorithm = h["algorithm"]
      @content_digest = h["content_digest"]
      freeze
    end

    # @return [Boolean]
    def verified? = status == :verified
    # @return [Boolean]
    def not_recorded? = status == :not_recorded
  end
end
