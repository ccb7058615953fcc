# frozen_string_literal: true

module Microsandbox
  # Changes to a new sandbox's root filesystem, passed as `Sandbox.create(patches: [...])`.
  #
  # They are applied in order after the guest boots and before `create` returns (so before
  # any of your commands and before the image's main process). The sandbox's copy-on-write
  # root keeps them, so {Sandbox.start} does not apply them again. New files and
  # directories belong to root. If one fails, `create` raises {PatchFailedError} naming
  # it and leaves nothing behind.
  #
  # Each constructor validates its arguments (absolute guest paths without NUL bytes,
  # permission modes 0..0o7777) and returns a frozen value object.
  #
  # @example
  #   Microsandbox::Sandbox.create("app", image: "alpine", patches: [
  #     Microsandbox::Patch.text("/etc/app.conf", "debug = true\n", mode: 0o600),
  #     Microsandbox::Patch.mkdir("/var/app", mode: 0o750),
  #     Microsandbox::Patch.append("/etc/hosts", "10.0.0.5 db\n"),
  #     Microsandbox::Patch.copy_file("config/seed.sql", "/srv/seed.sql"),
  #     Microsandbox::Patch.copy_dir("vendor/app", "/opt/app"),
  #     Microsandbox::Patch.symlink("/opt/app/bin/run", "/usr/local/bin/run"),
  #     Microsandbox::Patch.remove("/etc/motd")
  #   ])
  module Patch
    # Behaviour shared by every patch value object.
    module Change
      # @return [Symbol] :text, :mkdir, :append, :copy_file, :copy_dir, :symlink or :remove
      def kind
        self.class::KIND
      end

      # @return [String]
      def inspect
        fields = to_h.map do |k, v|
          shown = if k == :content then "<#{v.bytesize} bytes>"
                  elsif k == :mode && v then format("0o%o", v)
                  else v.inspect
                  end
          "#{k}=#{shown}"
        end
        "#<#{self.class.name} #{fields.join(' ')}>"
      end

      # The JSON shape the engine reads (contents as base64: they may be binary).
      # @api private
      # @return [Hash{String=>Object}]
      def to_config
        h = { "kind" => kind.to_s }
        to_h.each do |k, v|
          next if v.nil?

          h[k.to_s] = k == :content ? [v].pack("m0") : v
        end
        h
      end
    end

    # Create or replace a file (missing parent directories are created).
    Text = Struct.new(:path, :content, :mode) { include Change }
    Text::KIND = :text
    # Create a directory and missing parents; an existing directory gets the mode.
    Mkdir = Struct.new(:path, :mode) { include Change }
    Mkdir::KIND = :mkdir
    # Append to an existing file.
    Append = Struct.new(:path, :content) { include Change }
    Append::KIND = :append
    # Copy a host file into the guest.
    CopyFile = Struct.new(:src, :dst, :mode) { include Change }
    CopyFile::KIND = :copy_file
    # Copy a host directory tree into the guest.
    CopyDir = Struct.new(:src, :dst) { include Change }
    CopyDir::KIND = :copy_dir
    # Create a symlink.
    Symlink = Struct.new(:target, :link) { include Change }
    Symlink::KIND = :symlink
    # Remove a path recursively.
    Remove = Struct.new(:path) { include Change }
    Remove::KIND = :remove

    class << self
      # A file with `content` (binary-safe), replacing any file at `path`.
      # @param path [String] absolute guest path
      # @param content [String]
      # @param mode [Integer] permission bits (default 0o644, exact: no umask)
      # @return [Text]
      def text(path, content, mode: 0o644)
        Text.new(guest(path), bytes(content), mode!(mode)).freeze
      end

      # A directory, with its missing parents (like `mkdir -p`). Fails when a file is in
      # the way.
      # @param path [String] absolute guest path
      # @param mode [Integer] permission bits of the directory (default 0o755)
      # @return [Mkdir]
      def mkdir(path, mode: 0o755)
        Mkdir.new(guest(path), mode!(mode)).freeze
      end

      # Appends `content` to an existing file (fails when the file is missing).
      # @param path [String] absolute guest path
      # @param content [String]
      # @return [Append]
      def append(path, content)
        Append.new(guest(path), bytes(content)).freeze
      end

      # Copies a host file to `dst` (missing parent directories are created). The host
      # file must exist when `create` runs; it is read then, streaming.
      # @param src [String, Pathname] host path (relative to the current directory)
      # @param dst [String] absolute guest path
      # @param mode [Integer, nil] permission bits (default: the host file's)
      # @return [CopyFile]
      def copy_file(src, dst, mode: nil)
        CopyFile.new(host(src), guest(dst), mode.nil? ? nil : mode!(mode)).freeze
      end

      # Copies a host directory's contents into the guest directory `dst` (created, or
      # merged into): directories, regular files and symlinks, with their permission bits.
      # Other file types fail the patch.
      # @param src [String, Pathname] host directory
      # @param dst [String] absolute guest path
      # @return [CopyDir]
      def copy_dir(src, dst)
        CopyDir.new(host(src), guest(dst)).freeze
      end

      # A symlink at `link` pointing at `target` (like `ln -sf target link`; a directory
      # at `link` is not replaced).
      # @param target [String] what the link points at (may be relative)
      # @param link [String] absolute guest path of the link
      # @return [Symlink]
      def symlink(target, link)
        target = Validate.utf8!("target", Validate.string!("target", target))
        raise InvalidConfigError, "symlink target must not be empty or contain NUL bytes" if target.empty? || target.include?("\0")

        Symlink.new(target.dup.freeze, guest(link)).freeze
      end

      # Removes a path and everything under it (like `rm -rf`; a missing path is fine).
      # @param path [String] absolute guest path
      # @return [Remove]
      def remove(path)
        Remove.new(guest(path)).freeze
      end

      # Checks a `patches:` option.
      # @api private
      def validate_list!(patches)
        raise TypeError, "patches must be an Array of Microsandbox::Patch values (got #{patches.class})" unless patches.is_a?(Array)

        patches.each_with_index do |p, i|
          raise TypeError, "patches[#{i}] must be made by Microsandbox::Patch (got #{p.class})" unless p.is_a?(Change)
        end
        patches
      end

      private

      def guest(path)
        Validate.guest_path!("path", path).dup.freeze
      end

      def bytes(content)
        Validate.string!("content", content).b.freeze
      end

      def host(src)
        src = src.to_path if src.respond_to?(:to_path)
        File.expand_path(Validate.utf8!("source", Validate.string!("source", src))).freeze
      end

      def mode!(mode)
        Validate.integer!("mode", mode)
        raise InvalidConfigError, format("mode must be between 0 and 0o7777 (got 0o%o)", mode) unless mode.between?(0, 0o7777)

        mode
      end
    end
  end
end
