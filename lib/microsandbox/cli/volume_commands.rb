# frozen_string_literal: true

module Microsandbox
  class CLI
    # `volume create | ls | inspect | rm`, and the `-v`/`--tmpfs` options of `run`. A gem
    # without named volumes ({Microsandbox::Volume}) refuses them with `unsupported`.
    module VolumeCommands
      # `-v SOURCE:GUEST[:ro]`: SOURCE is a host path (starts with / or .) or a volume name.
      VOLUME = /\A(?<source>[^:]+):(?<guest>\/[^:]*)(?::(?<mode>ro|rw))?\z/

      private

      def cmd_volume(argv)
        sub = argv.shift
        case sub
        when "create" then volume_create(argv)
        when "ls", "list" then volume_ls(argv)
        when "inspect" then volume_inspect(argv)
        when "rm", "remove" then volume_rm(argv)
        when "-h", "--help", nil
          @out.puts "usage: microsandbox volume create [--kind dir|disk] [--size MIB] [--quota MIB] NAME | ls | inspect NAME | rm NAME..."
          sub.nil? ? EXIT_CODES[:usage] : EXIT_CODES[:ok]
        else raise UsageError, "unknown volume command #{sub.inspect} (create, ls, inspect, rm)"
        end
      end

      def volume_create(argv)
        o = { labels: {} }
        parser("volume create [OPTIONS] NAME") do |p|
          p.separator "A named volume under the home; mount it with `run -v NAME:/guest/path`."
          p.separator ""
          p.on("--kind KIND", "dir (default: a host directory, shared live) or disk (an ext4 image)") { |v| o[:kind] = v }
          p.on("--size MIB", Integer, "size of a disk volume (required for --kind disk)") { |v| o[:size_mib] = v }
          p.on("--quota MIB", Integer, "most a dir volume may hold") { |v| o[:quota_mib] = v }
          p.on("-l", "--label KEY=VAL", "label (repeatable)") { |v| add_pair(o[:labels], v, "--label") }
        end.parse!(argv)
        expect_args!(argv, 1, 1, "volume create")
        info = volume_api.create(argv[0], **o.compact)
        @json ? emit_json(volume_summary(info)) : @out.puts(info.name)
        EXIT_CODES[:ok]
      end

      def volume_ls(argv)
        parser("volume ls").parse!(argv)
        expect_args!(argv, 0, 0, "volume ls")
        volumes = volume_api.list
        if @json
          emit_json(volumes.map { |v| volume_summary(v) })
        else
          table(%w[NAME KIND USED CAPACITY CREATED],
                volumes.map do |v|
                  [v.name, v.kind.to_s, human_bytes(v.used_bytes), v.capacity_bytes ? human_bytes(v.capacity_bytes) : "-",
                   local_time(v.created_at)]
                end)
        end
        EXIT_CODES[:ok]
      end

      def volume_inspect(argv)
        parser("volume inspect NAME...").parse!(argv)
        expect_args!(argv, 1, nil, "volume inspect")
        @out.puts JSON.pretty_generate(argv.map { |name| volume_summary(volume_api.get(name)) })
        EXIT_CODES[:ok]
      end

      def volume_rm(argv)
        parser("volume rm NAME...") { |p| p.separator "Deletes volumes and their contents (refused while a running sandbox mounts one)." }
          .parse!(argv)
        expect_args!(argv, 1, nil, "volume rm")
        api = volume_api
        each_name(argv) { |name| api.remove(name) }
      end

      def volume_api
        return Microsandbox::Volume if Microsandbox.const_defined?(:Volume, false)

        raise UnsupportedError, "named volumes are not in this version of the gem"
      end

      def volume_summary(info)
        { "name" => info.name, "kind" => info.kind.to_s, "path" => info.path, "used_bytes" => info.used_bytes,
          "capacity_bytes" => info.capacity_bytes, "size_mib" => info.size_mib, "quota_mib" => info.quota_mib,
          "labels" => info.labels, "created_at" => iso_time(info.created_at) }
      end

      # `run -v`/`--tmpfs` as `Sandbox.create`'s `volumes:` Hash.
      def add_volume(o, text)
        m = VOLUME.match(text)
        raise UsageError, "-v takes SOURCE:/GUEST[:ro] (SOURCE a host path or a volume name; got #{text.inspect})" unless m

        source = m[:source].start_with?("/", ".") ? { bind: File.expand_path(m[:source]) } : { named: m[:source] }
        o[:volumes][m[:guest]] = source.merge(readonly: m[:mode] == "ro")
      end

      def add_tmpfs(o, text)
        guest, _, size = text.partition(":")
        raise UsageError, "--tmpfs takes /GUEST[:SIZE_MIB] (got #{text.inspect})" unless guest.start_with?("/") && size.match?(/\A\d*\z/)

        o[:volumes][guest] = { tmpfs: true, size_mib: size.empty? ? nil : Integer(size, 10) }.compact
      end
    end
  end
end
