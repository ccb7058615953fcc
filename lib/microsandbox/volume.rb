# frozen_string_literal: true

require "json"

module Microsandbox
  # Named volumes: storage under {Microsandbox.home} (`volumes/<name>/`) that outlives
  # sandboxes. A `"dir"` volume is a host directory, shared live with every sandbox that
  # mounts it (`volumes: { "/data" => { named: "cache" } }`) and readable and writable
  # on the host through {VolumeFs} without booting anything. A `"disk"` volume is a
  # sparse ext4 image of a fixed size, attached to a sandbox as a block device.
  #
  # {Sandbox.remove} never deletes a volume; {Volume.remove} refuses while a running
  # sandbox mounts it.
  #
  # @example
  #   Microsandbox::Volume.create("cache", kind: "disk", size_mib: 512)
  #   Microsandbox::Volume.list # => [#<Microsandbox::VolumeInfo cache disk ...>]
  #   Microsandbox::Volume.remove("cache")
  class Volume
    KINDS = %w[dir disk].freeze

    class << self
      # Creates a volume.
      # @param name [String] 1-63 letters, digits, `_`, `.` or `-`, starting with a letter or digit
      # @param kind [String, Symbol] "dir" (default) or "disk"
      # @param size_mib [Integer, nil] size of a disk volume in MiB (required for "disk",
      #   8..1048576; not accepted for "dir")
      # @param quota_mib [Integer, nil] most a dir volume may hold, in MiB (not accepted for "disk")
      # @param labels [Hash{String=>String}, nil] free-form labels (values made Strings)
      # @return [VolumeInfo]
      # @raise [VolumeAlreadyExistsError] a volume of that name exists
      # @raise [InvalidConfigError] a bad name, kind, size or quota (nothing is created)
      # @raise [TypeError] an argument of the wrong type
      def create(name, kind: "dir", size_mib: nil, quota_mib: nil, labels: nil)
        kind = kind.to_s if kind.is_a?(Symbol)
        Validate.string!("kind", kind)
        Validate.integer!("size_mib", size_mib) unless size_mib.nil?
        Validate.integer!("quota_mib", quota_mib) unless quota_mib.nil?
        labels = Validate.env!("labels", Validate.coerce_values!("labels", labels)).to_h
        opts = { kind: kind, size_mib: size_mib, quota_mib: quota_mib, labels: labels }
        VolumeInfo.from_json(Native.volume_create(Microsandbox.home, name!(name), JSON.generate(opts)))
      end

      # @param name [String]
      # @return [VolumeInfo]
      # @raise [VolumeNotFoundError]
      def get(name)
        VolumeInfo.from_json(Native.volume_get(Microsandbox.home, name!(name)))
      end

      # Every volume, sorted by name.
      # @return [Array<VolumeInfo>]
      def list
        JSON.parse(Native.volume_list(Microsandbox.home)).map { |h| VolumeInfo.new(h) }
      end

      # Deletes a volume and everything in it.
      # @param name [String]
      # @return [nil]
      # @raise [VolumeNotFoundError]
      # @raise [VolumeInUseError] a running sandbox mounts it (stop that sandbox first)
      def remove(name)
        Native.volume_remove(Microsandbox.home, name!(name))
      end

      # Host-side access to a dir volume's files (no VM involved).
      # @param name [String]
      # @return [VolumeFs]
      # @raise [VolumeNotFoundError]
      def fs(name)
        get(name).fs
      end

      private

      def name!(name)
        Validate.string!("name", name.is_a?(Symbol) ? name.to_s : name)
      end
    end
  end

  # A volume as {Volume.get}/{Volume.list} found it (a snapshot: sizes are those at the
  # time of the call).
  class VolumeInfo
    # @return [String]
    attr_reader :name
    # @return [String] host path of the content: a dir volume's data directory or a disk
    #   volume's image file
    attr_reader :path
    # @return [Symbol] :dir or :disk
    attr_reader :kind
    # @return [Integer, nil] a dir volume's quota in MiB
    attr_reader :quota_mib
    # @return [Integer, nil] a disk volume's size in MiB
    attr_reader :size_mib
    # @return [Integer] bytes the volume occupies on the host (allocated blocks)
    attr_reader :used_bytes
    # @return [Integer, nil] most the guest can store: the disk size or the quota, in
    #   bytes (nil: a dir volume without quota, bounded by the host filesystem)
    attr_reader :capacity_bytes
    # @return [String, nil] "raw" for disk volumes
    attr_reader :disk_format
    # @return [String, nil] "ext4" for disk volumes
    attr_reader :disk_fstype
    # @return [Hash{String=>String}]
    attr_reader :labels
    # @return [Time]
    attr_reader :created_at

    # @api private
    def self.from_json(json)
      new(JSON.parse(json))
    end

    # @api private
    # @param h [Hash] the engine's record
    def initialize(h)
      @name = h.fetch("name")
      @path = h.fetch("path")
      @kind = h.fetch("kind").to_sym
      @quota_mib = h["quota_mib"]
      @size_mib = h["size_mib"]
      @used_bytes = h.fetch("used_bytes")
      @capacity_bytes = h["capacity_bytes"]
      @disk_format = h["disk_format"]
      @disk_fstype = h["disk_fstype"]
      @labels = (h["labels"] || {}).freeze
      @created_at = Time.at(h.fetch("created_at"))
      freeze
    end

    # @return [VolumeFs] host-side access to this volume's files
    def fs
      VolumeFs.new(name)
    end

    # @return [Boolean]
    def dir? = kind == :dir
    # @return [Boolean]
    def disk? = kind == :disk

    # @return [String]
    def inspect
      cap = capacity_bytes ? " capacity=#{capacity_bytes}" : ""
      "#<#{self.class.name} #{name} #{kind} used=#{used_bytes}#{cap}>"
    end
  end

  # A dir volume's files, on the host, without booting a VM. Paths are relative to the
  # volume root (a leading "/" means that root: "/a" and "a" are the same file) and, like
  # Linux names, bytes (only NUL is refused).
  #
  # The volume is shared with guests, which may plant symlinks (also to paths that do not
  # exist yet) or swap a directory for a symlink while a call runs: every path is
  # resolved beneath the volume root, the way `openat2(RESOLVE_BENEATH)` does, so no call
  # reads or writes anything outside the volume — `..` above the root, absolute symlink
  # targets and symlinks leading out raise {FilesystemError}. Symlinks that stay inside
  # are followed.
  #
  # Disk volumes raise {UnsupportedOperationError}: their files live inside the ext4
  # image; mount them in a sandbox.
  class VolumeFs
    # @param name [String] the volume's name
    def initialize(name)
      @name = Validate.string!("name", name)
    end

    # @return [String]
    attr_reader :name

    # @param path [String]
    # @return [String] the whole file, binary (ASCII-8BIT); at most 256 MiB
    # @raise [PathNotFoundError] no such file
    # @raise [FilesystemError] the path leads outside the volume, or another failure
    def read(path)
      call("read", path)
    end

    # The whole file as a UTF-8 String. No byte is replaced or dropped: a file that is
    # not valid UTF-8 raises (read its bytes with {#read}), so the String returned is
    # always valid (`=~`, `split` and friends cannot raise on it later).
    # @param path [String]
    # @return [String] UTF-8
    # @raise [PathNotFoundError] no such file
    # @raise [FilesystemError] the file is not valid UTF-8, or as {#read}
    def read_text(path)
      Microsandbox.utf8_text(read(path), path, "read")
    end

    # Creates or truncates a file and writes `data` (bytes, any encoding).
    # @param path [String]
    # @param data [String]
    # @return [nil]
    # @raise [TypeError] data is not a String (nor converts to one with `#to_str`)
    def write(path, data)
      call("write", path, Microsandbox.coerce_write_bytes(data))
      nil
    end

    # Entries of a directory, sorted by name (symlinks not followed).
    # @param path [String]
    # @return [Array<FsEntry>] `path` is relative to the volume root ("/" + names)
    def list(path = "/")
      dir = rel!(path)
      base = dir.end_with?("/") ? dir : "#{dir}/"
      base = "/#{base}" unless base.start_with?("/")
      call("list", dir).map do |name, kind, size, mode, sec, nsec|
        FsEntry.new(name: name, path: FS.join_bytes(base, name), kind: kind, size: size, mode: mode,
                    modified: Time.at(sec, nsec, :nsec))
      end
    end

    # Creates a directory and its missing parents (an existing one is fine).
    # @param path [String]
    # @return [nil]
    def mkdir(path)
      call("mkdir", path)
    end

    # Removes a file or symlink (never what a symlink points to).
    # @param path [String]
    # @return [nil]
    def remove_file(path)
      call("remove_file", path)
    end

    # Removes a directory and everything in it (symlinks inside are removed, not followed).
    # @param path [String]
    # @return [nil]
    def remove_dir(path)
      call("remove_dir", path)
    end

    # @param path [String]
    # @return [Boolean] whether it exists (following symlinks that stay inside)
    def exists?(path)
      call("exists", path)
    end

    # Copies a file (contents and permission bits).
    # @param src [String]
    # @param dst [String]
    # @return [nil]
    def copy(src, dst)
      call("copy", src, rel!(dst))
      nil
    end

    # Renames (moves) a path inside the volume.
    # @param src [String]
    # @param dst [String]
    # @return [nil]
    def rename(src, dst)
      call("rename", src, rel!(dst))
    end

    # Metadata of a path (symlinks not followed).
    # @param path [String]
    # @return [FsMetadata]
    def stat(path)
      kind, size, mode, uid, gid, sec, nsec, bsec, bnsec = call("stat", path)
      FsMetadata.new(kind: kind, size: size, mode: mode, uid: uid, gid: gid, mtime: Time.at(sec, nsec, :nsec),
                     created: bsec && Time.at(bsec, bnsec || 0, :nsec))
    end

    # @return [String]
    def inspect
      "#<#{self.class.name} #{name}>"
    end

    private

    def call(op, path, arg = nil)
      Native.volume_fs(Microsandbox.home, @name, op, rel!(path), arg)
    end

    def rel!(path)
      path = path.to_path if path.respond_to?(:to_path)
      path = Validate.string!("path", path)
      path = path.encode(Encoding::UTF_8) unless path.encoding.ascii_compatible?
      raise InvalidConfigError, "path must not contain NUL bytes" if path.b.include?("\0")

      path
    end
  end
end

module Microsandbox
  class Volume
    # `volumes:` of {Sandbox.create}: guest path => mount, normalized for the engine.
    # @api private
    module Mounts
      SOURCES = %i[bind named tmpfs disk].freeze
      FLAGS = %i[readonly ro noexec nosuid nodev].freeze
      OTHER = %i[size_mib format fstype].freeze
      # The reference's file-server policies (bind and named mounts). Its engine keeps a
      # guest-side metadata overlay in a `user.*` xattr of each host file (`:strict` /
      # `:relaxed`) and lets guest `chmod` touch only that overlay (`:private`). virtiofsd,
      # which serves host directories here, has no such overlay: the guest sees and
      # changes the host inode's real owner, group and mode. So only the values that name
      # this behaviour are accepted (`stat_virtualization: :off`, `host_permissions:
      # :mirror`); the others raise UnsupportedError rather than mounting with a policy
      # that is not enforced.
      POLICIES = { stat_virtualization: { "off" => true, "strict" => false, "relaxed" => false },
                   host_permissions: { "mirror" => true, "private" => false } }.freeze
      # The reference's older `options: %w[ro noexec]` form: each word sets a flag.
      OPTION_WORDS = { "ro" => "readonly", "readonly" => "readonly", "rw" => nil, "noexec" => "noexec",
                       "nosuid" => "nosuid", "nodev" => "nodev" }.freeze

      module_function

      # @param volumes [Hash{String=>String, Hash}, nil]
      # @return [Array<Hash{String=>Object}>] one Hash per mount, for the engine
      # @raise [TypeError] volumes is not a Hash, a guest path not a String, a spec not a
      #   String or Hash, a flag not true/false, a size not an Integer
      # @raise [InvalidConfigError] unknown keys, no or several sources, a relative bind path,
      #   an unknown `options:` word or policy value, a policy on a tmpfs or disk mount
      # @raise [UnsupportedError] `stat_virtualization: :strict/:relaxed` or
      #   `host_permissions: :private` (virtiofsd has no metadata overlay)
      def coerce(volumes)
        return [] if volumes.nil?
        raise TypeError, "volumes must be a Hash of guest path => mount (got #{volumes.class})" unless volumes.is_a?(Hash)

        volumes.map do |guest, spec|
          guest = guest.to_s if guest.is_a?(Symbol)
          guest = Validate.utf8!("volumes", Validate.string!("volumes guest path", guest))
          one(guest, spec.is_a?(String) || spec.respond_to?(:to_path) ? { bind: spec } : spec)
        end
      end

      def one(guest, spec)
        raise TypeError, "volumes[#{guest.inspect}] must be a host path String or a Hash (got #{spec.class})" unless spec.is_a?(Hash)

        spec = spec.transform_keys { |k| k.is_a?(String) ? k.to_sym : k }
        bad = spec.keys - SOURCES - FLAGS - OTHER - POLICIES.keys - %i[options quota_mib]
        raise InvalidConfigError, "volumes[#{guest.inspect}]: unknown key(s) #{bad.map(&:inspect).join(', ')}; use one of bind:, named:, tmpfs:, disk: with readonly:/ro:, noexec:, nosuid:, nodev:, size_mib: (tmpfs), format:/fstype: (disk)" unless bad.empty?

        policies!(guest, spec)
        if spec.key?(:quota_mib)
          raise InvalidConfigError, "volumes[#{guest.inspect}]: quota_mib: belongs to the volume: Volume.create(name, quota_mib: N), then mount it with named:"
        end

        out = { "guest" => guest }
        if spec.key?(:bind)
          path = spec[:bind]
          path = path.to_path if path.respond_to?(:to_path)
          out["bind"] = File.expand_path(Validate.string!("volumes[#{guest.inspect}] bind", path))
        end
        out["named"] = Validate.string!("volumes[#{guest.inspect}] named", spec[:named].is_a?(Symbol) ? spec[:named].to_s : spec[:named]) if spec.key?(:named)
        out["tmpfs"] = bool!(guest, :tmpfs, spec[:tmpfs]) if spec.key?(:tmpfs)
        if spec.key?(:disk)
          path = spec[:disk]
          path = path.to_path if path.respond_to?(:to_path)
          out["disk"] = File.expand_path(Validate.string!("volumes[#{guest.inspect}] disk", path))
        end
        out["size_mib"] = Validate.integer!("volumes[#{guest.inspect}] size_mib", spec[:size_mib]) unless spec[:size_mib].nil?
        %i[format fstype].each do |k|
          out[k.to_s] = Validate.string!("volumes[#{guest.inspect}] #{k}", spec[k].is_a?(Symbol) ? spec[k].to_s : spec[k]) unless spec[k].nil?
        end
        out["readonly"] = bool!(guest, :readonly, spec[:readonly]) || bool!(guest, :ro, spec[:ro])
        %i[noexec nosuid nodev].each { |k| out[k.to_s] = bool!(guest, k, spec[k]) }
        option_words(guest, spec[:options]).each { |flag| out[flag] = true }
        out
      end

      # Checks `stat_virtualization:` / `host_permissions:` (see {POLICIES}).
      def policies!(guest, spec)
        POLICIES.each do |key, values|
          next if spec[key].nil?

          value = Validate.string!("volumes[#{guest.inspect}] #{key}", spec[key].is_a?(Symbol) ? spec[key].to_s : spec[key])
          unless values.key?(value)
            raise InvalidConfigError, "volumes[#{guest.inspect}] #{key}: #{value.inspect} is not one of #{values.keys.map { |v| ":#{v}" }.join(', ')}"
          end
          unless spec.key?(:bind) || spec.key?(:named)
            raise InvalidConfigError, "volumes[#{guest.inspect}] #{key}: applies to bind: and named: mounts only"
          end
          next if values[value]

          raise UnsupportedError, "volumes[#{guest.inspect}] #{key}: :#{value} needs a guest-side metadata overlay " \
                                  "that virtiofsd does not have; host directories are shared with their real owner, group and mode " \
                                  "(#{key}: :#{values.key(true)}, the default)"
        end
      end

      # The flags an `options:` Array of words sets (see {OPTION_WORDS}).
      def option_words(guest, words)
        return [] if words.nil?
        raise TypeError, "volumes[#{guest.inspect}] options: must be an Array of words (got #{words.class})" unless words.is_a?(Array)

        words.filter_map do |w|
          word = w.is_a?(Symbol) ? w.to_s : Validate.string!("volumes[#{guest.inspect}] options", w)
          unless OPTION_WORDS.key?(word)
            raise InvalidConfigError, "volumes[#{guest.inspect}] options: unknown word #{word.inspect}; use ro/readonly, rw, noexec, nosuid or nodev"
          end

          OPTION_WORDS[word]
        end
      end

      def bool!(guest, key, value)
        return false if value.nil?
        raise TypeError, "volumes[#{guest.inspect}] #{key}: must be true or false (got #{value.inspect})" unless [true, false].include?(value)

        value
      end
    end
  end
end
